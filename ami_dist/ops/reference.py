"""Pure-PyTorch twin of the fused LNS op: the same random stream and maths, differentiable by autograd.

It is the correctness reference for the C++/CUDA kernels and the fallback when the extension
is not built. Unlike the fused op it materialises ε (K copies of μ's size) and lets autograd save
what it needs, so it is neither fast nor memory-lean. The normals are computed in float64 straight
from the definition in DESIGN.md §3 and then rounded to the accumulation dtype.
"""

from __future__ import annotations

import math

import torch

from ami_dist.ops import _checks

__all__ = ["lns_sample", "lns_score_grad", "normal_stream", "philox4x32_10"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U64 = 1 << 64


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low words of a * b for a 32-bit constant a and int64 tensor b of 32-bit values.

    a is split into 16-bit halves so that no intermediate exceeds 2**48: int64 tensors cannot
    hold the full 64-bit product, and relying on wrap-around would be undefined behaviour.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo
    p_hi = b * a_hi
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 counters [..., 4] (each word in [0, 2**32)) under key (k0, k1)."""
    if counter.dtype != torch.int64 or counter.shape[-1:] != (4,):
        raise ValueError("philox4x32_10: counter must be an int64 tensor of shape [..., 4]")
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for rnd in range(10):
        if rnd > 0:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _normals_of_counters(q: torch.Tensor, seed: int) -> torch.Tensor:
    """The four float64 normals of each counter index q (int64 tensor) -> [..., 4]."""
    counter = torch.stack((q & _MASK32, q >> 32, torch.zeros_like(q), torch.zeros_like(q)), dim=-1)
    words = philox4x32_10(counter, (seed & _MASK32, seed >> 32))
    u = (words.to(torch.float64) + 0.5) * 2.0**-32
    r01 = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[..., 2]))
    t01 = 2.0 * math.pi * u[..., 1]
    t23 = 2.0 * math.pi * u[..., 3]
    return torch.stack((r01 * torch.cos(t01), r01 * torch.sin(t01), r23 * torch.cos(t23), r23 * torch.sin(t23)), -1)


def normal_stream(seed: int, offset: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 normals of draws offset, offset+1, ..., offset+count-1 (indices taken mod 2**64).

    Draw j is component j mod 4 of Philox counter j div 4 under key (seed mod 2**32, seed div 2**32).
    """
    seed = _checks.as_uint64(seed, "seed")
    offset = _checks.as_uint64(offset, "offset")
    if count < 0:
        raise ValueError(f"normal_stream: count must be >= 0, got {count}")
    parts = []
    start, left = offset, count
    while left > 0:
        # A run of draws that does not wrap past 2**64; at most two runs.
        n = min(left, _U64 - start)
        q_first, q_last = start >> 2, (start + n - 1) >> 2
        q = torch.arange(q_first, q_last + 1, dtype=torch.int64, device=device)
        z = _normals_of_counters(q, seed).reshape(-1)
        lead = start & 3
        parts.append(z[lead : lead + n])
        start, left = (start + n) % _U64, left - n
    if not parts:
        return torch.empty(0, dtype=torch.float64, device=device)
    return torch.cat(parts)


def _epsilon(mu: torch.Tensor, k: int, seed: int, offset: int) -> torch.Tensor:
    """ε of shape (k,) + mu.shape in the accumulation dtype: draw offset + k·N + i for element i."""
    eps = normal_stream(seed, offset, k * mu.numel(), device=mu.device)
    return eps.reshape((k, *mu.shape)).to(_checks.acc_dtype(mu.dtype))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # Written out instead of F.softplus (which switches to x above a threshold) so that the
    # fused op's formula, max(x, 0) + log1p(e^-|x|), is matched exactly, also in float64.
    return torch.clamp_min(x, 0) + torch.log1p(torch.exp(-x.abs()))


def lns_sample(
    h: torch.Tensor,
    mu: torch.Tensor,
    k: int,
    lam: float,
    seed: int,
    offset: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_noisy[k] = h + lam·δ_k, strength[k] = ‖δ_k‖ over the last dim, δ_k = μ + softplus(μ)·ε_k.

    Returns (h_noisy of shape (k,) + h.shape, strength of shape (k,) + h.shape[:-1]), both in h's
    dtype. Where mask is False (padding) there is no noise and the strength is 0.
    """
    h, mu, k, lam, seed, offset, mask = _checks.check_sample_args(h, mu, k, lam, seed, offset, mask)
    acc = _checks.acc_dtype(mu.dtype)
    mu_a = mu.to(acc)
    eps = _epsilon(mu, k, seed, offset)
    delta = mu_a + _softplus(mu_a) * eps
    if mask is not None:
        delta = torch.where(mask.unsqueeze(-1), delta, 0.0)
    h_noisy = h.to(acc) + lam * delta
    strength = torch.linalg.vector_norm(delta, dim=-1)
    return h_noisy.to(h.dtype), strength.to(h.dtype)


def lns_score_grad(
    mu: torch.Tensor,
    rewards: torch.Tensor,
    seed: int,
    offset: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """dμ = Σ_k r_k ⊙ ∂ log N(δ_k; μ, softplus(μ)) / ∂μ, with δ_k the draws of lns_sample.

    rewards has shape (k,) + mu.shape[:-1] (one value per sample and row); the result has mu's
    shape and dtype and is 0 where mask is False.
    """
    mu, rewards, seed, offset, mask = _checks.check_score_args(mu, rewards, seed, offset, mask)
    k = rewards.shape[0]
    acc = _checks.acc_dtype(mu.dtype)
    mu_a = mu.to(acc)
    eps = _epsilon(mu, k, seed, offset)
    sigma = _softplus(mu_a)
    r = rewards.unsqueeze(-1)
    # ∂/∂μ log N(δ; μ, σ(μ)) at δ = μ + σε is ε/σ + (ε² − 1)·σ'(μ)/σ, and σ' = sigmoid.
    dmu = (r * (eps / sigma + (eps * eps - 1) * torch.sigmoid(mu_a) / sigma)).sum(0)
    if mask is not None:
        dmu = torch.where(mask.unsqueeze(-1), dmu, 0.0)
    return dmu.to(mu.dtype)
