"""CUDA kernels of the LNS op against the CPU kernels and the reference (GPU machines only)."""

from __future__ import annotations

import pytest
import torch

from ami_dist.ops import fused, reference

pytestmark = [
    pytest.mark.usefixtures("built_extension"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() and fused.has_kernel_for(torch.device("cuda"))),
        reason="needs a GPU and an extension built with CUDA",
    ),
]

CUDA = torch.device("cuda")


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g).to(dtype)
    mu = (torch.randn(shape, generator=g) * 2).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    return h, mu, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (4, 2, 64), (2, 1030), (64, 33, 512)], ids=str)
@pytest.mark.parametrize("offset", [0, 6])
def test_cuda_forward_matches_cpu_kernel(shape, dtype, offset):
    h, mu, mask = _inputs(shape, dtype)
    cpu = fused.lns_sample(h, mu, 5, 0.1, 99, offset, mask)
    gpu = fused.lns_sample(h.to(CUDA), mu.to(CUDA), 5, 0.1, 99, offset, mask.to(CUDA))
    tol = {torch.float32: 1e-5, torch.float64: 1e-6}.get(dtype, 2.0**-7)
    for c, g in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=tol, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_backward_and_score_match_cpu_kernel(dtype):
    shape, k = (8, 3, 100), 5
    h, mu, mask = _inputs(shape, dtype)
    grad_out = torch.randn(k, *shape).to(dtype)
    grad_s = torch.randn(k, *shape[:-1]).to(dtype)
    rewards = torch.randn(k, *shape[:-1])
    results = []
    for dev in ("cpu", CUDA):
        hh, mm = h.to(dev).requires_grad_(), mu.to(dev).requires_grad_()
        out = fused.lns_sample(hh, mm, k, 0.1, 5, 8, mask.to(dev))
        grads = torch.autograd.grad(out, (hh, mm), (grad_out.to(dev), grad_s.to(dev)))
        score = fused.lns_score_grad(mu.to(dev), rewards.to(dev), 5, 8, mask.to(dev))
        results.append([t.cpu() for t in (*grads, score)])
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2.0**-6, "atol": 1e-3}
    for c, g in zip(*results, strict=True):
        torch.testing.assert_close(g, c, **tol)


def test_cuda_matches_reference_and_gradcheck():
    h, mu, mask = _inputs((3, 4, 9), torch.float64)
    h, mu, mask = h.to(CUDA).requires_grad_(), mu.to(CUDA).requires_grad_(), mask.to(CUDA)
    got = fused.lns_sample(h, mu, 3, 0.2, 1, 4, mask)
    want = reference.lns_sample(h, mu, 3, 0.2, 1, 4, mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    assert torch.autograd.gradcheck(lambda a, b: fused.lns_sample(a, b, 3, 0.2, 1, 4, mask), (h, mu))


def test_cuda_opcheck():
    h, mu, mask = _inputs((3, 2, 6), torch.float32)
    h, mu, mask = h.to(CUDA).requires_grad_(), mu.to(CUDA).requires_grad_(), mask.to(CUDA)
    torch.library.opcheck(torch.ops.ami_dist.lns_sample.default, (h, mu, 3, 0.1, 9, 4, mask))
    rewards = torch.randn(3, 3, 2, device=CUDA)
    torch.library.opcheck(torch.ops.ami_dist.lns_score_grad.default, (mu.detach(), rewards, 9, 4, mask))


def test_cuda_rejects_tensors_on_different_devices():
    h, mu, _ = _inputs((2, 8), torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.ami_dist.lns_sample(h, mu.to(CUDA), 1, 0.1, 0, 0, None)
