"""The demo GPT-2 on the generative contract: nothing of its own. inferline.CausalLM loads the store build (a
save_pretrained directory) exactly as it loads the hub's `gpt2` where a hub is reachable (options.source)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferline import CausalLM
from inferline.server.store import MANIFEST, read_manifest, resolve, versions


class Gpt2(CausalLM):
    """GPT-2 family checkpoints: the demo build, or options.source = "gpt2" / "distilgpt2" / a directory."""


def load(source: str | Path, device: str = "cpu", threads: int = 1) -> tuple[Any, Any]:
    """(model, tokenizer) from a store directory (model or version directory), a save_pretrained directory or a hub
    id, loaded exactly as a worker loads them. For tests, benchmarks and notebooks."""
    gpt2 = Gpt2()
    path = Path(source)
    if path.is_dir() and (versions(path) or (path / MANIFEST).is_file()):
        gpt2.artifact = resolve(path)
        gpt2.manifest = read_manifest(gpt2.artifact)
        gpt2.version = str(gpt2.manifest.get("version", gpt2.version))
    else:
        gpt2.options = {"source": str(source)}
    gpt2.threads = threads
    gpt2.setup(device)
    return gpt2.model, gpt2.tokenizer
