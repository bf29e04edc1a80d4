"""Reading the model store: <store>/<name>/<version>/ holding a model's files and its manifest.json. Workers read
artifacts through this module; building them is the model zoo's job (inferline/zoo/store.py writes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def version_order(name: str) -> tuple[int, int, str]:
    """Sort key of a version's name: numbers in numeric order ("9" before "10"), after them any other name in text
    order (the zoo's UTC date-time stamps sort as text)."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def versions(root: Path) -> list[Path]:
    """The complete version directories (those with a manifest) under a model directory, oldest first: numbers in
    numeric order, then the other names in text order."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / MANIFEST).is_file()), key=lambda p: version_order(p.name))


def latest(store: Path, name: str) -> Path | None:
    """The newest complete version directory of `name`, or None."""
    done = versions(store / name)
    return done[-1] if done else None


def resolve(path: Path, version: str | None = None) -> Path:
    """A version directory (has manifest.json) as is, or a model directory's version `version` (its newest when
    None). Raises FileNotFoundError when there is none."""
    if (path / MANIFEST).is_file():
        if version is not None and path.name != version:
            raise FileNotFoundError(f"{path} is version {path.name}, not the pinned version {version}")
        return path
    done = versions(path)
    if version is not None:
        if not (path / version / MANIFEST).is_file():
            raise FileNotFoundError(f"no version {version} under {path}; versions: {[p.name for p in done]}")
        return path / version
    if not done:
        raise FileNotFoundError(f"no built model under {path} (expected {path}/<version>/{MANIFEST})")
    return done[-1]


def read_manifest(version_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((version_path / MANIFEST).read_text())
    return data
