"""Small building blocks shared across the model."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(dim: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers with GELU between them."""
    mods: list[nn.Module] = []
    widths = [dim] + [hidden] * (layers - 1) + [out]
    for i in range(layers):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < layers - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods)


class LearnedTensor(nn.Module):
    """A learned tensor (embeddings, queries) served by a module call. Modules that return
    dataclasses must not own parameters directly: ZeRO-3 gathers a parameter for backward
    through hooks on its module's tensor outputs."""

    def __init__(self, *shape: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))
        nn.init.trunc_normal_(self.weight, std=std)

    def forward(self) -> Tensor:
        return self.weight


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's residual branch with probability ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)
