"""Tiny framework-free models for broker and worker tests (like mosec's tests/services/), written against the public
contract. Loaded by real worker processes through their dotted path, e.g. "tests.runtimes:Echo"."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from inferline import InputError, Model, Tensor


class EchoRow(BaseModel):
    """Any fields (echoed back), an optional FP32 vector `x` (v2), and switches: reject -> InputError; sleep_s -> the
    batch sleeps; raise -> the model raises; kill -> the process dies mid-batch (a poison pill); kill_if_exists -> the
    same while that file exists (a poison a test can cure); where -> the answer names the worker thread that ran the
    batch."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    x: Tensor[np.float32, -1] | None = None
    reject: bool = False
    sleep_s: float = Field(0.0, ge=0, le=60)
    fail: bool = Field(False, alias="raise")
    kill: bool = False
    kill_if_exists: str | None = None
    where: bool = False


class EchoAnswer(BaseModel):
    y: Tensor[np.float32, -1] | None = None   # 2 * x
    echo: dict[str, Any]
    batch: int                                # the size of the batch it ran in
    pid: int
    thread: str | None = None                 # the worker thread that ran the batch (when `where` was set)


class Echo(Model):
    platform = "inferline_test"
    max_batch_size = 32

    def setup(self, device: str) -> None:
        self.version = "1"

    def predict(self, batch: list[EchoRow]) -> list[EchoAnswer]:
        if any(row.kill or (row.kill_if_exists and os.path.exists(row.kill_if_exists)) for row in batch):
            os._exit(17)
        if any(row.fail for row in batch):
            raise RuntimeError("poisoned item")
        for row in batch:
            if row.reject:
                raise InputError("`reject` was set", field="reject")
        time.sleep(max(row.sleep_s for row in batch))
        return [EchoAnswer(y=None if row.x is None else row.x * 2,
                           echo=row.model_dump(exclude={"x", "kill_if_exists"}, by_alias=True, exclude_defaults=True),
                           batch=len(batch), pid=os.getpid(),
                           thread=threading.current_thread().name if row.where else None) for row in batch]


class NoopRow(BaseModel):
    x: Tensor[np.float32, 784]   # an MNIST image's worth of floats, as the cnn takes: real tensor requests' decode


class NoopAnswer(BaseModel):
    y: Tensor[np.float32, -1]


class Noop(Model):
    """Answers at once with a constant: the pure serving overhead of a 784-float tensor request (benchmarks)."""

    platform = "inferline_test"
    max_batch_size = 32
    ZERO = np.zeros(1, np.float32)

    def predict(self, batch: list[NoopRow]) -> list[NoopAnswer]:
        return [NoopAnswer(y=self.ZERO) for _ in batch]


class HangRow(BaseModel):
    x: float = 0.0
    hang: bool = False   # the marker: predict never returns for a batch holding this row


class HangAnswer(BaseModel):
    y: float
    pid: int


class Hang(Model):
    """A model whose predict hangs for good on a marked row (a user model stuck in a lock, a dead device, an endless
    loop): predict_timeout_s must fail the batch and get the worker replaced. Other rows answer y = 2x at once."""

    platform = "inferline_test"
    max_batch_size = 8

    def predict(self, batch: list[HangRow]) -> list[HangAnswer]:
        if any(row.hang for row in batch):
            threading.Event().wait()   # forever: nothing ever sets it
        return [HangAnswer(y=2 * row.x, pid=os.getpid()) for row in batch]


class RatioRow(BaseModel):
    a: float
    b: float


class RatioAnswer(BaseModel):
    q: float   # a plain float field: pydantic lets NaN and infinity through, as a user's model may


class Ratio(Model):
    """q = a / b in numpy's arithmetic: b = 0 gives inf (or NaN for 0 / 0), an answer JSON cannot spell."""

    platform = "inferline_test"
    max_batch_size = 8

    def predict(self, batch: list[RatioRow]) -> list[RatioAnswer]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return [RatioAnswer(q=float(np.float64(row.a) / np.float64(row.b))) for row in batch]
