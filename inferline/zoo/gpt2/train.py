"""Build the demo `gpt2` of the zoo: a byte-level BPE tokenizer and a small GPT2LMHeadModel trained on the
offline English of inferline/zoo/gpt2/data.py, saved with save_pretrained so the real loading code
(inferline.CausalLM, AutoModelForCausalLM) serves it exactly as it would serve the hub's `gpt2`.

    python -m inferline.zoo.gpt2.train --store /tmp/store            # full build, a few minutes on 2 cores
    python -m inferline.zoo.gpt2.train --store /tmp/store --quick    # seconds: a tiny model for tests
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# In transformers 5 GPT2TokenizerFast is an alias of the (tokenizers-backed) GPT2Tokenizer and missing from the
# stubs; the 4.x name keeps `tokenizer_object=` working on 4.x too.
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # type: ignore[attr-defined]

from inferline.zoo import store
from inferline.zoo.gpt2 import data

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class BuildConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    block: int            # training sequence length (<= n_positions)
    batch: int
    steps: int
    lr: float
    max_chars: int | None  # None: the whole corpus
    topics: bool           # include pydoc_data.topics (long documents) or only the (short) docstrings
    eval_blocks: int


# Full: ~8 min at 1 thread on these CPUs (measured 497 s; held-out loss 4.48, perplexity 88) for ~2.8 epochs of
# the 360k-token corpus; short, mostly grammatical sentences. `--steps 1500` (~12 min) reaches 4.21 / 68 and reads
# better. 4 layers x 128 (see ../shared/ENVIRONMENT.md) is about the largest model that gets that far in that time.
FULL = BuildConfig(vocab_size=4096, n_positions=256, n_embd=128, n_layer=4, n_head=4, block=128, batch=16,
                   steps=1000, lr=3e-3, max_chars=None, topics=True, eval_blocks=64)
# Quick (tests): ~15 s. Big enough to emit varied tokens and to have learnt that documents end (the topics are long
# documents, the docstrings short ones, so greedy output runs on while sampling meets EOS now and then).
QUICK = BuildConfig(vocab_size=1024, n_positions=256, n_embd=64, n_layer=2, n_head=2, block=64, batch=16,
                    steps=300, lr=1e-2, max_chars=300_000, topics=True, eval_blocks=16)


def train_tokenizer(docs: list[str], vocab_size: int, n_positions: int) -> GPT2TokenizerFast:
    """Byte-level BPE (every byte is in the alphabet, so any text round-trips) wrapped as a GPT-2 tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, model_max_length=n_positions,
                             bos_token=EOS, eos_token=EOS, unk_token=EOS)


def _stream(tokenizer: GPT2TokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by EOS so the model learns where text ends."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # The Rust tokenizer directly: the wrapper warns about every document longer than model_max_length.
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, stream: torch.Tensor, block: int, max_blocks: int) -> float:
    """Mean next-token loss over non-overlapping held-out blocks."""
    model.eval()
    n = min(max_blocks, (len(stream) - 1) // block)
    if n == 0:
        raise ValueError("held-out stream shorter than one block")
    x = stream[: n * block].view(n, block)
    losses = [model(input_ids=x[i : i + 16], labels=x[i : i + 16]).loss.item() for i in range(0, n, 16)]
    sizes = [min(16, n - i) for i in range(0, n, 16)]
    model.train()
    return sum(loss * s for loss, s in zip(losses, sizes, strict=True)) / n


def sample_texts(model: GPT2LMHeadModel, tokenizer: GPT2TokenizerFast, prompts: list[str], n: int = 40) -> list[str]:
    """Greedy continuations (model.generate) for a human look at the build; not used for metrics."""
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                 repetition_penalty=1.2)
            out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def _allocate(store_dir: Path) -> tuple[str, Path]:
    """A fresh version directory. new_version() ticks once a second; two builds in the same second (tests,
    forced rebuilds) must not write into one directory, so wait for the next free stamp."""
    while True:
        version = store.new_version()
        out = store.version_dir(store_dir, "gpt2", version)
        try:
            out.mkdir(parents=True, exist_ok=False)
            return version, out
        except FileExistsError:
            time.sleep(0.2)


def train(store_dir: Path, quick: bool, threads: int = 1, seed: int = 0, steps: int | None = None) -> Path:
    """Build tokenizer + model, save both under <store>/gpt2/<version>/ and write the manifest last.
    Returns the version directory. Deterministic for a given seed, thread count and torch build.
    `steps` overrides the configuration's number of optimizer steps."""
    cfg = QUICK if quick else FULL
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    started = time.monotonic()

    docs = data.documents(max_chars=cfg.max_chars, topics=cfg.topics)
    rng.shuffle(docs)
    n_held = max(len(docs) // 20, 20)  # 5% of documents never seen in training: the perplexity is honest
    held, train_docs = docs[:n_held], docs[n_held:]

    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, cfg.n_positions)
    train_ids, held_ids = _stream(tokenizer, train_docs), _stream(tokenizer, held)

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(cfg.steps // 20, 1)

    def lr_at(step: int) -> float:
        # Linear warm-up then cosine to 10%: the usual small-GPT schedule; a constant lr plateaus early.
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        frac = (step - warmup) / max(cfg.steps - warmup, 1)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(seed)
    max_start = len(train_ids) - cfg.block - 1
    train_loss = float("nan")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, max_start, (cfg.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + cfg.block] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # An exponential average: one batch's loss is too noisy to report.
        train_loss = loss.item() if step == 0 else 0.95 * train_loss + 0.05 * loss.item()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("step=%d/%d loss=%.3f s=%.0f", step, cfg.steps, train_loss, time.monotonic() - started)

    train_s = time.monotonic() - started
    held_loss = evaluate(model, held_ids, cfg.block, cfg.eval_blocks)
    model.eval()

    version, out = _allocate(store_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest: dict[str, Any] = {
        "name": "gpt2",
        "version": version,
        "kind": "generation",
        "runtime": "inferline.zoo.gpt2.serve:Gpt2",
        "framework": "pytorch",
        "source": str(out.resolve()),
        "n_positions": cfg.n_positions,
        "context_length": cfg.n_positions,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build": asdict(cfg) | {"seed": seed, "threads": threads},
        "metrics": {
            "heldout_loss": round(held_loss, 4),
            "heldout_perplexity": round(math.exp(held_loss), 2),
            "train_loss": round(train_loss, 4),
            "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(held_ids)),
            "train_seconds": round(train_s, 1),
        },
        "quick": quick,
    }
    store.write_manifest(out, manifest)
    log.info("built gpt2 version=%s heldout_loss=%.3f s=%.0f", version, held_loss, train_s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=store.default_store())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the build's own)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    out = train(args.store, args.quick, threads=args.threads, seed=args.seed, steps=args.steps)
    manifest = store.read_manifest(out)
    print(f"built {out} metrics={manifest['metrics']}")
    model = GPT2LMHeadModel.from_pretrained(out)
    tokenizer = GPT2TokenizerFast.from_pretrained(out)
    prompts = ["The function returns", "If the file does not exist,", "This module provides"]
    for prompt, text in zip(prompts, sample_texts(model, tokenizer, prompts), strict=True):
        print(f"--- {prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
