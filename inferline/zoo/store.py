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

from inferline.server.store import MANIFEST, latest, read_manifest, resolve, versions

__all__ = ["MANIFEST", "default_store", "latest", "new_version", "read_manifest", "resolve", "version_dir", "versions",
           "write_manifest"]


def default_store() -> Path:
    """INFERLINE_MODEL_STORE, else ./model_store."""
    return Path(os.environ.get("INFERLINE_MODEL_STORE", "model_store")).resolve()


def new_version() -> str:
    """A sortable version string, one per build: UTC date-time to the second."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


def version_dir(store: Path, name: str, version: str) -> Path:
    return store / name / version


def write_manifest(version_path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last and atomically: a version directory without one is an unfinished build.
    Files are made world-readable (save_pretrained writes 0600), so a non-root image can read the store."""
    version_path.mkdir(parents=True, exist_ok=True)
    tmp = version_path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(version_path / MANIFEST)
    for p in version_path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
