"""ZeRO's step on CPU (distributed/deepspeed_adapter/zero_cpu): the gradient norm with float64 accuracy without a
float64 copy, and the flattening of the gradients that frees them as it goes. Both run inside ZeRO in
test_zero_matches_torch, against plain PyTorch's clipping and updates."""

from __future__ import annotations

import pytest
import torch

from ami_dist.distributed.deepspeed_adapter.zero_cpu import sum_of_squares


@pytest.mark.parametrize("shape", [(0,), (1,), (1023,), (1024,), (1025,), (7, 1000), (3, 4096)])
def test_sum_of_squares_matches_float64(shape: tuple[int, ...]) -> None:
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 10_000 + shape[-1])) * 1e-3
    got = sum_of_squares(grad)
    want = grad.double().square().sum()
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-6, atol=0.0), (got.item(), want.item())  # float32 rounding


def test_sum_of_squares_is_more_accurate_than_a_float32_norm() -> None:
    """Over millions of elements a float32 norm drifts (~1e-5 here); the row norms do not."""
    grad = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0)) + 0.5
    want = grad.double().square().sum().item()
    row_wise = abs(sum_of_squares(grad).item() - want) / want
    plain = abs(torch.linalg.vector_norm(grad).double().square().item() - want) / want
    assert row_wise < 1e-6
    assert row_wise < plain / 10, (row_wise, plain)


def test_flatten_releasing_concatenates_pads_and_lets_go_of_each_input() -> None:
    """ZeRO's step flattens the gradients for the optimizer; ami-dist's flatten frees each as it goes."""
    import weakref

    from ami_dist.distributed.deepspeed_adapter.zero_cpu import flatten_releasing

    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    want = torch.cat([t.reshape(-1) for t in tensors] + [torch.zeros(4)])
    shapes = [t.shape for t in tensors]
    alive = [weakref.ref(t) for t in tensors]
    got = flatten_releasing(tensors, want.numel())
    assert torch.equal(got, want)
    assert [t.shape for t in tensors] == shapes
    assert all(got.data_ptr() <= t.data_ptr() < got.data_ptr() + got.numel() * 4 for t in tensors)
    assert [ref() for ref in alive] == [None, None, None]  # the list held them; nothing does now
