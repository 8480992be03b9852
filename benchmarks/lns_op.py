"""Benchmark the fused LNS op against an eager PyTorch baseline and torch.compile of that baseline.

The eager baseline is written the way the official AMI code does it: torch.randn noise, softplus,
the K noisy copies materialised, and autograd saving what it saves. The pure-PyTorch Philox twin
(ami_dist.ops.reference) is a correctness reference, not a speed baseline, so it is not timed.

    .venv/bin/python benchmarks/lns_op.py                # both shapes, CPU (and CUDA if present)
    .venv/bin/python benchmarks/lns_op.py --shapes small --no-compile

Times are medians over --repeats runs after warm-up, all measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ami_dist.ops import fused

SHAPES = {"small": (50, 64, 512, 5), "large": (100, 128, 1024, 5)}  # (L, B, D, K)
LAM = 0.1
SEED = 1234


def eager_lns(
    h: torch.Tensor, mu: torch.Tensor, k: int, lam: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: K materialised noisy copies, autograd keeps ε and δ for backward."""
    sigma = F.softplus(mu)
    eps = torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)
    delta = (mu + sigma * eps) * mask.unsqueeze(-1)
    h_noisy = h + lam * delta
    strength = delta.norm(dim=-1)
    return h_noisy, strength


def eager_score_grad(mu: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_k r_k ∂ log N(δ_k; μ, σ)/∂μ with ε drawn (and held) as the eager baseline does."""
    eps = torch.randn((rewards.shape[0], *mu.shape), dtype=mu.dtype, device=mu.device)
    sigma = F.softplus(mu)
    r = rewards.unsqueeze(-1)
    return (r * (eps / sigma + (eps * eps - 1) * torch.sigmoid(mu) / sigma)).sum(0) * mask.unsqueeze(-1)


def fused_lns(
    h: torch.Tensor, mu: torch.Tensor, k: int, lam: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused.lns_sample(h, mu, k, lam, SEED, 0, mask)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of distinct storages autograd saves for backward during fn()."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@dataclass
class Row:
    impl: str
    forward: float
    fwd_bwd: float
    score: float | None
    saved: int | None


def bench_shape(shape: tuple[int, int, int, int], device: torch.device, repeats: int, compile_: bool) -> None:
    length, batch, dim, k = shape
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(length, batch, dim, device=device, generator=gen)
    mu = torch.randn(length, batch, dim, device=device, generator=gen)
    # About 10% padding, as in a batch of unequal sentences.
    mask = torch.rand(length, batch, device=device, generator=gen) > 0.1
    grad_h = torch.randn(k, length, batch, dim, device=device, generator=gen)
    grad_s = torch.randn(k, length, batch, device=device, generator=gen)
    rewards = torch.randn(k, length, batch, device=device, generator=gen)
    hh, mm = h.clone().requires_grad_(), mu.clone().requires_grad_()
    mask_f = mask.to(mu.dtype)

    impls: dict[str, Callable] = {"fused": lambda a, b: fused_lns(a, b, k, LAM, mask)}
    impls["eager"] = lambda a, b: eager_lns(a, b, k, LAM, mask_f)
    compile_seconds = None
    if compile_:
        compiled = torch.compile(eager_lns, dynamic=False)
        impls["compile"] = lambda a, b: compiled(a, b, k, LAM, mask_f)
        start = time.perf_counter()
        out = impls["compile"](hh, mm)
        torch.autograd.backward(out, (grad_h, grad_s))
        compile_seconds = time.perf_counter() - start

    rows = []
    for name, fn in impls.items():

        def forward(fn: Callable = fn) -> object:
            with torch.no_grad():
                return fn(h, mu)

        def forward_backward(fn: Callable = fn) -> None:
            hh.grad = mm.grad = None
            torch.autograd.backward(fn(hh, mm), (grad_h, grad_s))

        t_fwd = median_time(forward, device, repeats)
        t_fb = median_time(forward_backward, device, repeats)
        score = None
        if name == "fused":
            score = median_time(lambda: fused.lns_score_grad(mu, rewards, SEED, 0, mask), device, repeats)
        elif name == "eager":
            score = median_time(lambda: eager_score_grad(mu, rewards, mask_f), device, repeats)
        saved = saved_bytes(lambda fn=fn: fn(hh, mm)) if name != "compile" else None
        rows.append(Row(name, t_fwd, t_fb, score, saved))

    by = {r.impl: r for r in rows}
    print(f"\n{device.type}  L={length} B={batch} D={dim} K={k}  ({torch.get_num_threads()} CPU threads)")
    if compile_seconds is not None:
        print(f"  torch.compile warm-up (compile + first run): {compile_seconds:.1f} s")
    print(f"  {'impl':<8} {'forward':>10} {'fwd+bwd':>10} {'score_grad':>11} {'saved for bwd':>14}")
    for r in rows:
        score = f"{r.score * 1e3:9.1f}ms" if r.score is not None else f"{'-':>11}"
        saved = f"{r.saved / 2**20:11.1f}MiB" if r.saved is not None else f"{'-':>14}"
        print(f"  {r.impl:<8} {r.forward * 1e3:8.1f}ms {r.fwd_bwd * 1e3:8.1f}ms {score} {saved}")
    fz, eg = by["fused"], by["eager"]
    print("  ratios (higher = fused better):")
    print(f"    eager/fused   forward {eg.forward / fz.forward:5.2f}x   fwd+bwd {eg.fwd_bwd / fz.fwd_bwd:5.2f}x"
          f"   score_grad {eg.score / fz.score:5.2f}x   (target fwd+bwd >= 3x)")
    if "compile" in by:
        cp = by["compile"]
        print(f"    compile/fused forward {cp.forward / fz.forward:5.2f}x   fwd+bwd {cp.fwd_bwd / fz.fwd_bwd:5.2f}x"
              "   (target fwd+bwd >= 1x)")
    print(f"    saved bytes fused/eager {fz.saved / eg.saved:.3f}   (target <= 1/K = {1 / k:.3f})")
    # What a memory-bound GPU kernel moves per element of mu, and the time that implies on an H100.
    size = h.element_size()
    per_elem = {"forward": (2 + k) * size, "backward": (k + 3) * size, "score_grad": 2 * size}
    model = ", ".join(
        f"{name} {b} B/elem = {b * mu.numel() / 3e12 * 1e6:.0f} us" for name, b in per_elem.items()
    )
    print(f"  GPU traffic model at 3 TB/s (H100): {model}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["small", "large", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args()
    if fused.load_error() is not None:
        raise SystemExit(f"the fused op is not built: {fused.load_error()}; {fused.BUILD_HINT}")
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available() and fused.has_kernel_for(torch.device("cuda")):
        devices.append(torch.device("cuda"))
    names = list(SHAPES) if args.shapes == "all" else [args.shapes]
    for device in devices:
        for name in names:
            bench_shape(SHAPES[name], device, args.repeats, compile_=not args.no_compile)


if __name__ == "__main__":
    main()
