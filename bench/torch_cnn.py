"""A PyTorch CNN of the classic MNIST shape, served by the benchmarks beside the Keras cnn: conv32-pool-conv64-pool-
dense128-dense10 with a softmax, weights from a fixed seed (no training: the benchmark measures speed, and every run
computes the same numbers), 1 intra-op thread. Written on the public contract only, as a user's model would be;
loaded by dotted path: model = "bench.torch_cnn:TorchCnn". Takes the cnn's v2 body (`input`, FP32 [28, 28, 1])."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from inferline import Model, Tensor

SEED = 0


class Digit(BaseModel):
    input: Tensor[np.float32, 28, 28, 1]


class DigitScores(BaseModel):
    probabilities: Tensor[np.float32, 10]


def network() -> Any:
    """The MNIST CNN with the fixed seed's weights, in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10),
                        nn.Softmax(dim=1))
    return net.eval()


class TorchCnn(Model):
    platform = "pytorch"
    max_batch_size = 32

    def setup(self, device: str) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.torch = torch
        self.net = network().to(device)
        self.device = device

    def forward(self, images: np.ndarray) -> np.ndarray:
        """[N, 28, 28, 1] float32 -> [N, 10] probabilities."""
        with self.torch.inference_mode():
            x = self.torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device)
            out: np.ndarray = self.net(x).cpu().numpy()
        return out

    def predict(self, batch: list[Digit]) -> list[DigitScores]:
        probs = self.forward(np.stack([row.input for row in batch]))
        return [DigitScores(probabilities=p) for p in probs]
