"""The compiled LNS op (torch.ops.ami_dist.*): fake kernels, autograd wiring and typed wrappers.

The kernels and schemas live in csrc/ and are registered with the dispatcher when ``ami_dist._C``
is imported. Backward saves only μ, the mask and the per-row norms (O(|μ|)); ε is regenerated
from (seed, offset) by ``lns_sample_backward``.
"""

from __future__ import annotations

import torch

from ami_dist.ops import _checks

__all__ = [
    "has_kernel_for",
    "lns_sample",
    "lns_score_grad",
    "load_error",
    "normal_stream",
    "philox4x32_10",
    "set_cpu_avx2",
]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation --no-deps -e .` from the repository root "
    "(or `make setup`); it needs a C++17 compiler, plus nvcc for the CUDA kernels"
)

_LOAD_ERROR: ImportError | None
try:
    from ami_dist import _C  # noqa: F401  (importing registers the ops)
except ImportError as exc:
    _LOAD_ERROR = exc
else:
    _LOAD_ERROR = None


def load_error() -> ImportError | None:
    """Why the extension could not be imported, or None when it is available."""
    return _LOAD_ERROR


def has_kernel_for(device: torch.device) -> bool:
    """Whether the built extension has kernels for this device type (e.g. CUDA in a CPU build)."""
    if _LOAD_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("ami_dist::lns_sample", key)


def _rows_shape(mu: torch.Tensor, k: int) -> tuple[int, ...]:
    return (k, *mu.shape[:-1])


def _register() -> None:
    @torch.library.register_fake("ami_dist::lns_sample")
    def _lns_sample_fake(h, mu, k, lam, seed, offset, mask=None):
        rows = _rows_shape(mu, k)
        return (
            mu.new_empty((k, *mu.shape)),
            mu.new_empty(rows),
            mu.new_empty(rows, dtype=_checks.acc_dtype(mu.dtype)),
        )

    @torch.library.register_fake("ami_dist::lns_sample_backward")
    def _lns_sample_backward_fake(grad_h_noisy, grad_strength, mu, norms, mask, k, lam, seed, offset):
        return torch.empty_like(mu), torch.empty_like(mu)

    @torch.library.register_fake("ami_dist::lns_score_grad")
    def _lns_score_grad_fake(mu, rewards, seed, offset, mask=None):
        return torch.empty_like(mu)

    def setup_context(ctx, inputs, output):
        _h, mu, k, lam, seed, offset, mask = inputs
        norms = output[2]
        ctx.save_for_backward(mu, norms, mask)
        ctx.k, ctx.lam, ctx.seed, ctx.offset = k, lam, seed, offset
        ctx.mark_non_differentiable(norms)
        # Unused outputs then arrive as None, and the kernel skips their terms instead of
        # reading a materialised tensor of zeros (strength is often unused, or h_noisy is).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_h_noisy, grad_strength, _grad_norms):
        mu, norms, mask = ctx.saved_tensors
        if grad_h_noisy is None and grad_strength is None:
            return (None,) * 7
        dh, dmu = torch.ops.ami_dist.lns_sample_backward(
            None if grad_h_noisy is None else grad_h_noisy.contiguous(),
            None if grad_strength is None else grad_strength.contiguous(),
            mu,
            norms,
            mask,
            ctx.k,
            ctx.lam,
            ctx.seed,
            ctx.offset,
        )
        return (
            dh if ctx.needs_input_grad[0] else None,
            dmu if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd("ami_dist::lns_sample", backward, setup_context=setup_context)


if _LOAD_ERROR is None:
    _register()


def _require() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"the fused LNS op (ami_dist._C) is not built: {_LOAD_ERROR}; {BUILD_HINT}")


def lns_sample(
    h: torch.Tensor,
    mu: torch.Tensor,
    k: int,
    lam: float,
    seed: int,
    offset: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused lns_sample (see ami_dist.ops.lns_sample); differentiable w.r.t. h and mu."""
    _require()
    h, mu, k, lam, seed, offset, mask = _checks.check_sample_args(h, mu, k, lam, seed, offset, mask)
    h_noisy, strength, _norms = torch.ops.ami_dist.lns_sample(
        h, mu, k, lam, _checks.to_dispatcher_int(seed), _checks.to_dispatcher_int(offset), mask
    )
    return h_noisy, strength


def lns_score_grad(
    mu: torch.Tensor,
    rewards: torch.Tensor,
    seed: int,
    offset: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused lns_score_grad (see ami_dist.ops.lns_score_grad); not itself differentiable."""
    _require()
    mu, rewards, seed, offset, mask = _checks.check_score_args(mu, rewards, seed, offset, mask)
    return torch.ops.ami_dist.lns_score_grad(
        mu, rewards, _checks.to_dispatcher_int(seed), _checks.to_dispatcher_int(offset), mask
    )


def normal_stream(seed: int, offset: int, count: int) -> torch.Tensor:
    """The kernels' float32 normals of draws offset .. offset+count-1 (CPU), for tests and tools."""
    _require()
    seed = _checks.as_uint64(seed, "seed")
    offset = _checks.as_uint64(offset, "offset")
    return torch.ops.ami_dist.normal_stream(
        _checks.to_dispatcher_int(seed), _checks.to_dispatcher_int(offset), count
    )


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """The kernels' Philox4x32-10 blocks for int64 counters [n, 4] (words in [0, 2**32))."""
    _require()
    return torch.ops.ami_dist.philox4x32_10(counter, torch.tensor(key, dtype=torch.int64))


def set_cpu_avx2(enable: bool) -> bool:
    """Use the AVX2 (True, the default where supported) or baseline x86-64 CPU kernels.

    Both variants compute the same numbers; the switch exists so that tests cover the baseline
    kernels on AVX2 machines too. Returns whether the AVX2 kernels are in use afterwards.
    """
    _require()
    return torch.ops.ami_dist.set_cpu_avx2(bool(enable))
