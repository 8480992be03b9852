"""Inverted dropout: the same Bernoulli(1 − p) keep-masks as ``nn.Dropout``, drawn faster on CPU.

On CPU, ``nn.Dropout``'s ``bernoulli_`` (and ``torch.rand``) draw one Mersenne-Twister number at a time
on one thread; with the compiled extension, float32 masks on CPU come from the Philox stream of
csrc/dropout_cpu.cpp instead (vectorised, on every intra-op thread: about five times faster than
``torch.rand`` here), keyed by a seed drawn from torch's generator, so ``torch.manual_seed`` still makes
runs repeatable. Elsewhere (CUDA, other dtypes, no extension) masks come from ``torch.rand``. With the
extension, :func:`dropout` applies the mask as the kernel draws it and keeps only one byte per element
for the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ami_dist.ops import fused

SEED_RANGE = 2**62


def _compiled(like: torch.Tensor) -> bool:
    return like.device.type == "cpu" and like.dtype == torch.float32 and fused.load_error() is None


def _draw_seed() -> int:
    """The Philox seed of one mask, from torch's generator (so torch.manual_seed repeats it)."""
    return int(torch.randint(SEED_RANGE, (), dtype=torch.int64))


def keep_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """A mask of ``shape``: 1/(1 − p) with probability 1 − p, else 0 (dtype and device of ``like``)."""
    if _compiled(like):
        return torch.ops.ami_dist.keep_mask(list(shape), p, _draw_seed(), 0)
    return torch.rand(shape, dtype=like.dtype, device=like.device).ge_(p).mul_(1 / (1 - p))


class _CompiledDropout(torch.autograd.Function):
    """``x * keep_mask(x.shape, p, x)`` in one pass, keeping for the backward pass one byte per element
    (the keep flags) instead of the float32 mask that autograd saves for the product: 75 of the 100 MB
    of masks a step of the 2+2-layer Transformer holds until its backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        out, kept = torch.ops.ami_dist.dropout(x, p, _draw_seed())  # the mask keep_mask would draw
        ctx.save_for_backward(kept)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (kept,) = ctx.saved_tensors
        return torch.ops.ami_dist.dropout_backward(grad, kept, ctx.p), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0:
        return x
    if _compiled(x):
        return _CompiledDropout.apply(x, p)
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
