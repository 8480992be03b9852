"""Latent noise sampling (LNS) op of AMI: the public API, with a switch between fused and reference.

``lns_sample`` draws K perturbations δ_k = μ + softplus(μ)·ε_k from a counter-based Philox stream
(DESIGN.md §3) and returns h + λ·δ_k and ‖δ_k‖; ``lns_score_grad`` is the score-function gradient
Σ_k r_k ∂ log N(δ_k; μ, softplus(μ))/∂μ for the same draws. ``set_impl`` picks the implementation:
"fused" (the C++/CUDA extension), "reference" (pure PyTorch, ``ami_dist.ops.reference``) or "auto"
(fused when built for the tensors' device, otherwise the reference with a one-time warning).
"""

from __future__ import annotations

import operator
import warnings
from types import ModuleType

import torch

from ami_dist.ops import fused, reference

__all__ = ["IMPLS", "get_impl", "lns_sample", "lns_score_grad", "next_offset", "set_impl"]

IMPLS = ("auto", "fused", "reference")

_impl = "auto"
_fallback_warned: set[str] = set()


def set_impl(name: str) -> None:
    """Select the implementation: "auto", "fused" or "reference" (config key ``lns.impl``)."""
    global _impl
    if name not in IMPLS:
        raise ValueError(f"lns impl must be one of {', '.join(IMPLS)}; got {name!r}")
    _impl = name


def get_impl() -> str:
    """The selected implementation name ("auto", "fused" or "reference")."""
    return _impl


def _backend(device: torch.device) -> ModuleType:
    if _impl == "reference":
        return reference
    error = fused.load_error()
    if error is not None:
        if _impl == "fused":
            raise RuntimeError(
                f"lns impl 'fused' was requested but the extension ami_dist._C is not built ({error}); "
                f"{fused.BUILD_HINT}; or set lns.impl to 'auto' or 'reference'"
            )
        reason = f"ami_dist._C is not built ({error}); {fused.BUILD_HINT}"
    elif not fused.has_kernel_for(device):
        if _impl == "fused":
            raise RuntimeError(
                f"lns impl 'fused' was requested but ami_dist._C has no kernels for {device.type} tensors "
                "(was it built without CUDA? set CUDA_HOME or AMI_DIST_FORCE_CUDA=1 and rebuild)"
            )
        reason = f"ami_dist._C has no kernels for {device.type} tensors"
    else:
        return fused
    if reason not in _fallback_warned:
        _fallback_warned.add(reason)
        warnings.warn(
            f"LNS: using the slower pure-PyTorch reference because {reason}", RuntimeWarning, stacklevel=3
        )
    return reference


def lns_sample(
    h: torch.Tensor,
    mu: torch.Tensor,
    k: int,
    lam: float,
    seed: int,
    offset: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K noisy copies of h and their noise strengths.

    Args:
        h: encoder states [..., D] (float16/bfloat16/float32/float64, contiguous).
        mu: noise-network output, same shape, dtype and device as h; σ = softplus(μ).
        k: number of samples K >= 1.
        lam: the LNS scale λ.
        seed: 64-bit stream key (fold the rank in so that ranks draw different noise).
        offset: first draw index; advance it with ``next_offset`` before the next call.
        mask: optional bool [...] (h.shape[:-1]), True at real tokens; padding gets no noise.

    Returns:
        (h_noisy [K, ..., D], strength [K, ...]) in h's dtype, where h_noisy[k] = h + λ·δ_k and
        strength[k] = ‖δ_k‖₂ over D, δ_k = μ + σ ⊙ ε_k. Differentiable w.r.t. h and mu.
    """
    return _backend(mu.device if isinstance(mu, torch.Tensor) else torch.device("cpu")).lns_sample(
        h, mu, k, lam, seed, offset, mask
    )


def lns_score_grad(
    mu: torch.Tensor,
    rewards: torch.Tensor,
    seed: int,
    offset: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k r_k ⊙ ∂ log N(δ_k; μ, softplus(μ))/∂μ for the δ_k of the lns_sample call with this seed/offset.

    rewards has shape (K,) + mu.shape[:-1] (a per-sentence reward expanded over positions); it is
    converted to the accumulation dtype (float32, or float64 for float64 mu). The result has mu's
    shape and dtype and is 0 at padding. It is the gradient to add to μ's grad for the REINFORCE
    term (negate it for a loss of −Σ r·log p).
    """
    return _backend(mu.device if isinstance(mu, torch.Tensor) else torch.device("cpu")).lns_score_grad(
        mu, rewards, seed, offset, mask
    )


def next_offset(offset: int, k: int, numel: int) -> int:
    """The offset for the next call: offset + K·N rounded up to a multiple of 4, modulo 2**64.

    Rounding keeps every call's first draw at the start of a Philox counter, so no counter's
    normals are shared between two calls.
    """
    offset, k, numel = operator.index(offset), operator.index(k), operator.index(numel)
    if offset < 0 or k < 1 or numel < 0:
        raise ValueError(f"next_offset needs offset >= 0, k >= 1, numel >= 0; got {offset}, {k}, {numel}")
    return (offset + ((k * numel + 3) // 4) * 4) % (1 << 64)
