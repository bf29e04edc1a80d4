"""Reading the model store: <store>/<name>/<version>/ holding a model's files and its manifest.json. Workers read
artifacts through this module; building them is the model zoo's job (inferline/zoo/store.py writes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def versions(root: Path) -> list[Path]:
    """The complete version directories (those with a manifest) under a model directory, oldest first."""
    return sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def latest(store: Path, name: str) -> Path | None:
    """The newest complete version directory of `name`, or None."""
    done = versions(store / name)
    return done[-1] if done else None


def resolve(path: Path) -> Path:
    """A version directory (has manifest.json) as is, or a model directory's newest version.
    Raises FileNotFoundError when there is none."""
    if (path / MANIFEST).is_file():
        return path
    done = versions(path)
    if not done:
        raise FileNotFoundError(f"no built model under {path} (expected {path}/<version>/{MANIFEST})")
    return done[-1]


def read_manifest(version_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((version_path / MANIFEST).read_text())
    return data
