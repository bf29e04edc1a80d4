"""Build the model zoo into a store: train each model that has no usable version yet.

`python -m inferline.zoo.build [--quick] [--force] [--store DIR] [names...]`

Each model lives in `models.<name>.train` with `train(store: Path, quick: bool) -> Path`. The train modules are
imported by name only when needed, so this module imports no framework and a model whose package is absent (gpt2
is built elsewhere) does not stop the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from inferline.zoo import store as model_store

log = logging.getLogger(__name__)

ZOO = ("cnn", "lstm", "sentiment", "transformer")   # the classic models: seconds to build
KNOWN = (*ZOO, "gpt2")

TrainFn = Callable[[Path, bool], Path]


def allocate_version(store: Path, name: str) -> tuple[str, Path]:
    """A new, not yet existing version directory for `name` (created empty; the manifest is written last).

    new_version() has one-second resolution; a forced rebuild within the same second must not overwrite the
    version it replaces, so wait for the next free stamp."""
    while True:
        version = model_store.new_version()
        path = model_store.version_dir(store, name, version)
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            time.sleep(0.2)
            continue
        return version, path


def usable_version(store: Path, name: str, quick: bool) -> Path | None:
    """The newest complete version that satisfies a build request, or None.

    A full build satisfies a quick request, but a quick (test-sized) build never satisfies a full one: otherwise a
    store once filled by tests would silently serve toy models."""
    for path in reversed(model_store.versions(store / name)):
        if quick or not model_store.read_manifest(path).get("quick", False):
            return path
    return None


def _train_module(name: str) -> ModuleType | None:
    """Import models.<name>.train, or None when that package is not (yet) in the tree."""
    module = f"inferline.zoo.{name}.train"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only a missing train module means "not available"; a missing dependency inside it is a real error.
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(metrics.items()):
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def build_missing(store: Path, names: Sequence[str], quick: bool = False, force: bool = False) -> dict[str, Path]:
    """Train every model in `names` that has no usable version in `store` (all of them when `force`).

    Returns {name: version directory} for every requested model that is available, built now or found. A name whose
    train module is absent is skipped with a warning. Raises ValueError for an unknown name; a training failure
    propagates (a half-written version has no manifest, so it never counts as built)."""
    # The progress bar is cosmetic; import it here so that importing this module stays cheap.
    from tqdm import tqdm

    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {list(KNOWN)}")
    store = Path(store)
    result: dict[str, Path] = {}
    bar = tqdm(list(dict.fromkeys(names)), desc="build", unit="model", file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        found = None if force else usable_version(store, name, quick)
        if found is not None:
            tqdm.write(f"{name}: up to date ({found.name})", file=sys.stderr)
            result[name] = found
            continue
        module = _train_module(name)
        if module is None:
            log.warning("skip model=%s: models.%s.train is not available", name, name)
            tqdm.write(f"{name}: skipped (no models.{name}.train)", file=sys.stderr)
            continue
        train: TrainFn = module.train
        started = time.perf_counter()
        path = train(store, quick)
        seconds = time.perf_counter() - started
        metrics = model_store.read_manifest(path).get("metrics", {})
        log.info("built model=%s version=%s quick=%s s=%.1f", name, path.name, quick, seconds)
        tqdm.write(f"{name}: built {path.name} in {seconds:.1f}s  {_format_metrics(metrics)}", file=sys.stderr)
        result[name] = path
    bar.close()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferline.zoo.build", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"models to build (default: all of {', '.join(KNOWN)})")
    parser.add_argument("--quick", action="store_true", help="tiny, seconds-long builds (for tests)")
    parser.add_argument("--force", action="store_true", help="build even when a usable version exists")
    parser.add_argument("--store", type=Path, default=None,
                        help="model store (default: INFERLINE_MODEL_STORE or ./model_store)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in KNOWN]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(KNOWN)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    names: list[str] = list(args.names) or list(KNOWN)
    store: Path = args.store if args.store is not None else model_store.default_store()
    built = build_missing(store, names, quick=args.quick, force=args.force)
    # Asked for by name but not available is a failure; the default list tolerates an absent gpt2.
    missing = [n for n in args.names if n not in built]
    if missing:
        log.error("not built: %s", ", ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
