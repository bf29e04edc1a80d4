"""Load a GPT-2-family causal LM and its tokenizer for serving: a Hugging Face hub id (`gpt2`, `distilgpt2`, any
GPT-2-family checkpoint) or a local save_pretrained directory (our store's models/gpt2 builds). The same code
serves the hub's real `gpt2` wherever a hub or a local HF cache is reachable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from models import store

log = logging.getLogger(__name__)


def _resolve(source: str | Path) -> str:
    """A store directory (model dir or version dir, with manifest.json) -> its version dir; a plain
    save_pretrained directory as is; anything else is taken to be a hub id."""
    path = Path(source)
    if path.is_dir():
        try:
            return str(store.resolve(path))
        except FileNotFoundError:
            return str(path)  # a save_pretrained dir without our manifest (e.g. a downloaded checkpoint)
    return str(source)


def load(source: str | Path, device: str = "cpu", threads: int = 1,
         dtype: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode on `device`, tokenizer). Sets torch's intra-op threads to `threads`: at the
    default (all cores) a worker collapses when another process is busy on the same CPUs. `dtype` ("float16",
    "bfloat16", ...) is opt-in: float32 is the default because GPT-2's fp16 activations can overflow.

    Raises OSError when the source is neither a directory nor a reachable hub id (set HF_HUB_OFFLINE=1 where
    there is no hub, or from_pretrained spends ~46 s retrying first)."""
    torch.set_num_threads(threads)
    name = _resolve(source)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model.to(device)  # type: ignore[arg-type]  # transformers' stubs type .to()'s wrapper wrongly
    model.eval()
    model.requires_grad_(False)  # serving never needs grads; also keeps autograd bookkeeping out of forward
    log.info("loaded model=%s class=%s device=%s threads=%d params=%d", name, type(model).__name__, device, threads,
             sum(p.numel() for p in model.parameters()))
    return model, tokenizer
