"""Benchmark the fused LNS op against an eager PyTorch baseline and torch.compile of that baseline.

The eager baseline is written the way the official AMI code does it: torch.randn noise, softplus,
the K noisy copies materialised, and autograd saving what it saves. The pure-PyTorch Philox twin
(ami_dist.ops.reference) is a correctness reference, not a speed baseline, so it is not timed.

    .venv/bin/python benchmarks/lns_op.py                # both shapes, CPU (and CUDA if present)
    .venv/bin/python benchmarks/lns_op.py --shapes small --no-compile

Times are medians over --repeats runs after warm-up, all measured in the same process. The roofline: the
bytes a memory-bound kernel must move per element of mu (forward: h and mu read, K copies written;
backward: K output gradients read, mu read, two input gradients written), over the fused op's time,
against the device's copy bandwidth measured in the same run (a 256 MiB clone, bytes read and written).
``--json FILE`` writes the figures for benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
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


def copy_bandwidth(device: torch.device, repeats: int, mib: int = 256) -> float:
    """Bytes per second a clone moves on ``device`` (read plus write), the roofline's reference."""
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    seconds = median_time(lambda: x.clone(), device, max(repeats, 3))
    return 2 * x.numel() * x.element_size() / seconds


def bench_shape(shape: tuple[int, int, int, int], device: torch.device, repeats: int, compile_: bool,
                bandwidth: float | None = None) -> dict:
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
    # What a memory-bound kernel moves per element of mu, over the fused op's time: the roofline.
    size = h.element_size()
    per_elem = {"forward": (2 + k) * size, "backward": (k + 3) * size, "score_grad": 2 * size}
    achieved = {"forward": per_elem["forward"] * mu.numel() / fz.forward,
                "fwd_bwd": (per_elem["forward"] + per_elem["backward"]) * mu.numel() / fz.fwd_bwd,
                "score_grad": per_elem["score_grad"] * mu.numel() / fz.score}
    if bandwidth:
        print(f"  roofline: copy bandwidth {bandwidth / 1e9:.0f} GB/s measured; fused achieves "
              + ", ".join(f"{name} {b / 1e9:.0f} GB/s ({b / bandwidth:.0%})" for name, b in achieved.items()))
    return {"device": device.type, "shape": list(shape), "eager_over_fused_fwd_bwd": eg.fwd_bwd / fz.fwd_bwd,
            "compile_over_fused_fwd_bwd": by["compile"].fwd_bwd / fz.fwd_bwd if "compile" in by else None,
            "fused_ms": {"forward": fz.forward * 1e3, "fwd_bwd": fz.fwd_bwd * 1e3, "score_grad": fz.score * 1e3},
            "achieved_bytes_per_s": achieved, "copy_bandwidth": bandwidth,
            "roofline_fraction": {n: b / bandwidth for n, b in achieved.items()} if bandwidth else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["small", "large", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if fused.load_error() is not None:
        raise SystemExit(f"the fused op is not built: {fused.load_error()}; {fused.BUILD_HINT}")
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    cuda_ready = torch.cuda.is_available() and fused.has_kernel_for(torch.device("cuda"))
    if args.device == "cuda" and not cuda_ready:
        raise SystemExit("--device cuda: no GPU, or the fused op was built without its CUDA kernels")
    if args.device in ("cuda", "all") and cuda_ready:
        devices.append(torch.device("cuda"))
    names = list(SHAPES) if args.shapes == "all" else [args.shapes]
    results = []
    for device in devices:
        bandwidth = copy_bandwidth(device, args.repeats)
        for name in names:
            results.append(bench_shape(SHAPES[name], device, args.repeats, compile_=not args.no_compile,
                                       bandwidth=bandwidth))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
