"""Find a deployment's Model class by its dotted path and load it: `package.module:Class` or `path/to/file.py:Class`.
The worker imports whatever the deployment names, and no model module by name of its own."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

from inferline.server import store
from inferline.server.config import ConfigError, ModelSpec
from inferline.server.model import Model

log = logging.getLogger(__name__)


def import_object(path: str) -> Any:
    """`package.module:Name` or `file.py:Name` -> the object. Raises ConfigError naming what is missing."""
    module_name, _, name = path.rpartition(":")
    if not module_name or not name:
        raise ConfigError(f"model {path!r} must look like 'package.module:Class' or 'file.py:Class'")
    if module_name.endswith(".py"):
        file = Path(module_name).resolve()
        if not file.is_file():
            raise ConfigError(f"model file {file} does not exist")
        spec = importlib.util.spec_from_file_location(file.stem, file)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[file.stem] = module   # pickling and typing.get_type_hints look the module up by name
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"{module_name} has no {name!r}") from None


def model_class(spec: ModelSpec) -> tuple[type[Model], Path | None, dict[str, Any]]:
    """(the Model class, its artifact or None, the artifact's manifest or {}) for a deployment. The class is the
    spec's `model`, else the artifact manifest's `runtime`. A store build resolves to its newest version directory;
    another existing path is handed over as it is (a save_pretrained directory, a weights file)."""
    version_dir: Path | None = None
    manifest: dict[str, Any] = {}
    path = Path(spec.artifact) if spec.artifact is not None else None
    if path is not None and ((path / store.MANIFEST).is_file() or store.versions(path)):
        try:                                    # a store build: its pinned or newest version, and its manifest
            version_dir = store.resolve(path, spec.version)
        except FileNotFoundError as exc:
            raise ConfigError(f"models.{spec.name}: {exc}") from None
        manifest = store.read_manifest(version_dir)
        # the version is the store directory's name: what a deployment pins and a rollout names (its Redis lane)
        manifest = {**manifest, "version": version_dir.name}
    elif path is not None and path.exists():
        version_dir = path                      # any other directory or file the model reads itself
    target = spec.model or manifest.get("runtime")
    if not target:
        raise ConfigError(f"models.{spec.name}.model is not set, and {spec.artifact} holds no built model naming one")
    cls = import_object(target)
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise ConfigError(f"models.{spec.name}.model {target!r} is not a subclass of inferline.Model")
    return cls, version_dir, manifest


def load_model(spec: ModelSpec, device: str) -> Model:
    """Instantiate the deployment's model, hand it its artifact, manifest, options and threads, and set it up."""
    cls, version_dir, manifest = model_class(spec)
    model = cls()
    model.artifact = version_dir   # None where the deployment's artifact path does not exist
    model.manifest = manifest
    model.version = str(manifest.get("version", model.version))
    model.options = dict(spec.options)
    model.threads = spec.threads
    started = time.perf_counter()
    model.setup(device)
    log.info("loaded model=%s class=%s version=%s device=%s ms=%.0f", spec.name, cls.__name__, model.version, device,
             (time.perf_counter() - started) * 1000)
    return model
