"""The model store: <store>/<name>/<version>/ holding the model files and a manifest.json.

The manifest says which runtime serves the artifact (a dotted path `module:Class`), its version,
input schema, labels, normalisation and held-out metrics. The newest version wins unless one is pinned.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def default_store() -> Path:
    """INFERLINE_MODEL_STORE, else ./model_store."""
    return Path(os.environ.get("INFERLINE_MODEL_STORE", "model_store")).resolve()


def new_version() -> str:
    """A sortable version string, one per build: UTC date-time to the second."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


def version_dir(store: Path, name: str, version: str) -> Path:
    return store / name / version


def latest(store: Path, name: str) -> Path | None:
    """The newest complete version directory of `name` (one with a manifest), or None."""
    root = store / name
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
    return done[-1] if done else None


def resolve(path: Path) -> Path:
    """Accept either a version directory (has manifest.json) or a model directory (pick the newest)."""
    if (path / MANIFEST).is_file():
        return path
    done = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file()) if path.is_dir() else []
    if not done:
        raise FileNotFoundError(f"no built model under {path} (expected {path}/<version>/{MANIFEST})")
    return done[-1]


def read_manifest(version_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((version_path / MANIFEST).read_text())
    return data


def write_manifest(version_path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last and atomically: a version directory without one is an unfinished build.
    Files are made world-readable (save_pretrained writes 0600), so a non-root image can read the store."""
    version_path.mkdir(parents=True, exist_ok=True)
    tmp = version_path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(version_path / MANIFEST)
    for p in version_path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
