"""Argument validation shared by the fused LNS op and its PyTorch reference."""

from __future__ import annotations

import operator

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_U64 = 1 << 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_uint64(value: object, name: str) -> int:
    """Validate a seed/offset: an int in [0, 2**64)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int in [0, 2**64), got a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(value).__name__}") from None
    if not 0 <= v < _U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v


def to_dispatcher_int(value: int) -> int:
    """A uint64 as the int64 with the same bits: the dispatcher's `int` is signed 64-bit."""
    return value - _U64 if value >= 1 << 63 else value


def check_k(k: object) -> int:
    """Validate the number of samples K: an int >= 1."""
    if isinstance(k, bool):
        raise TypeError("k (the number of samples) must be an int >= 1, got a bool")
    try:
        kk = operator.index(k)
    except TypeError:
        raise TypeError(f"k (the number of samples) must be an int >= 1, got {type(k).__name__}") from None
    if kk < 1:
        raise ValueError(f"k (the number of samples) must be >= 1, got {kk}")
    return kk


def check_lam(lam: object) -> float:
    """Validate the LNS scale λ: a real number."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float, got {type(lam).__name__}")
    return float(lam)


def _check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_mu(mu: object, op: str) -> torch.Tensor:
    """mu: a contiguous float16/bfloat16/float32/float64 tensor with at least one dim."""
    mu = _check_tensor(mu, "mu")
    if mu.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: mu must be float16, bfloat16, float32 or float64, got {mu.dtype}")
    if mu.dim() < 1:
        raise ValueError(f"{op}: mu must have at least one dimension (the model dim D)")
    if not mu.is_contiguous():
        raise ValueError(f"{op}: mu must be contiguous (call .contiguous())")
    return mu


def check_mask(mask: object, mu: torch.Tensor, op: str) -> torch.Tensor | None:
    """mask: None, or a contiguous bool tensor of shape mu.shape[:-1] on mu's device."""
    if mask is None:
        return None
    mask = _check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (True = real token), got {mask.dtype}")
    if mask.device != mu.device:
        raise ValueError(f"{op}: mask must be on {mu.device} like mu, got {mask.device}")
    if mask.shape != mu.shape[:-1]:
        raise ValueError(
            f"{op}: mask must have shape {tuple(mu.shape[:-1])} (mu's shape without the last dim), "
            f"got {tuple(mask.shape)}"
        )
    if not mask.is_contiguous():
        raise ValueError(f"{op}: mask must be contiguous")
    return mask


def check_sample_args(
    h: object, mu: object, k: object, lam: object, seed: object, offset: object, mask: object
) -> tuple[torch.Tensor, torch.Tensor, int, float, int, int, torch.Tensor | None]:
    """Validate lns_sample's arguments; returns them normalised (k, seed, offset as int)."""
    op = "lns_sample"
    mu = check_mu(mu, op)
    h = _check_tensor(h, "h")
    if h.device != mu.device:
        raise ValueError(f"{op}: h and mu must be on the same device, got {h.device} and {mu.device}")
    if h.dtype != mu.dtype:
        raise TypeError(f"{op}: h and mu must have the same dtype, got {h.dtype} and {mu.dtype}")
    if h.shape != mu.shape:
        raise ValueError(f"{op}: h and mu must have the same shape, got {tuple(h.shape)} and {tuple(mu.shape)}")
    if not h.is_contiguous():
        raise ValueError(f"{op}: h must be contiguous (call .contiguous())")
    return (
        h,
        mu,
        check_k(k),
        check_lam(lam),
        as_uint64(seed, "seed"),
        as_uint64(offset, "offset"),
        check_mask(mask, mu, op),
    )


def check_score_args(
    mu: object, rewards: object, seed: object, offset: object, mask: object
) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor | None]:
    """Validate lns_score_grad's arguments; rewards come back contiguous in the accumulation dtype.

    rewards are typically a per-sentence value expanded over positions, hence not contiguous;
    unlike h and mu they are small, so they are copied rather than rejected.
    """
    op = "lns_score_grad"
    mu = check_mu(mu, op)
    rewards = _check_tensor(rewards, "rewards")
    if not rewards.is_floating_point():
        raise TypeError(f"{op}: rewards must be a floating-point tensor, got {rewards.dtype}")
    if rewards.device != mu.device:
        raise ValueError(f"{op}: rewards must be on {mu.device} like mu, got {rewards.device}")
    if rewards.dim() != mu.dim() or rewards.shape[1:] != mu.shape[:-1] or rewards.shape[0] < 1:
        want = "(k" + "".join(f", {s}" for s in mu.shape[:-1]) + (",)" if mu.dim() == 1 else ")")
        raise ValueError(
            f"{op}: rewards must have shape (k,) + mu.shape[:-1] = {want} with k >= 1, "
            f"got {tuple(rewards.shape)}"
        )
    rewards = rewards.to(acc_dtype(mu.dtype)).contiguous()
    return (
        mu,
        rewards,
        as_uint64(seed, "seed"),
        as_uint64(offset, "offset"),
        check_mask(mask, mu, op),
    )
