"""The CPU dropout keep-mask kernel (csrc/dropout_cpu.cpp): element j keeps iff Philox word j of the
stream (seed, offset + j) is at least p·2³², checked against the pure-PyTorch Philox; and the Python
dropout uses it for float32 on CPU, repeatably under torch.manual_seed, applying it in one pass and
saving one byte per element for the backward pass (the dropout and dropout_backward ops)."""

from __future__ import annotations

import pytest
import torch

from ami_dist.models.dropout import keep_mask
from ami_dist.ops import reference


def _reference_mask(count: int, p: float, seed: int, offset: int) -> torch.Tensor:
    draws = torch.arange(offset, offset + count, dtype=torch.int64)
    q = draws >> 2
    counter = torch.stack((q & 0xFFFFFFFF, q >> 32, torch.zeros_like(q), torch.zeros_like(q)), dim=-1)
    words = reference.philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
    word = words.gather(1, (draws & 3).unsqueeze(1)).squeeze(1)
    return torch.where(word >= int(p * 2**32), 1 / (1 - p), 0.0).to(torch.float32)


@pytest.mark.parametrize(("shape", "offset"), [((3, 5), 0), ((2, 1500), 0), ((7, 333), 6), ((4099,), 2**33 + 1)])
def test_mask_is_the_philox_stream_thresholded(cpu_isa: str, shape: tuple[int, ...], offset: int) -> None:
    seed, p = 0x1234_5678_9ABC, 0.3
    mask = torch.ops.ami_dist.keep_mask(list(shape), p, seed, offset)
    assert mask.shape == shape and mask.dtype == torch.float32
    torch.testing.assert_close(mask.flatten(), _reference_mask(mask.numel(), p, seed, offset), rtol=0, atol=0)


def test_mask_rejects_p_out_of_range(built_extension) -> None:
    with pytest.raises(RuntimeError, match="p must be in"):
        torch.ops.ami_dist.keep_mask([4], 1.0, 0, 0)


def test_python_keep_mask_uses_the_kernel_and_follows_manual_seed(built_extension) -> None:
    like = torch.empty(0)
    torch.manual_seed(5)
    first = keep_mask((64, 500), 0.25, like)
    torch.manual_seed(5)
    assert torch.equal(keep_mask((64, 500), 0.25, like), first)
    assert not torch.equal(keep_mask((64, 500), 0.25, like), first)  # a new seed each call
    torch.manual_seed(5)
    seed = int(torch.randint(2**62, (), dtype=torch.int64))
    torch.testing.assert_close(first.flatten(), _reference_mask(64 * 500, 0.25, seed, 0), rtol=0, atol=0)
    doubles = keep_mask((64, 500), 0.25, torch.empty(0, dtype=torch.float64))  # torch.rand path
    assert doubles.dtype == torch.float64 and doubles.unique().tolist() == pytest.approx([0.0, 1 / 0.75])


@pytest.mark.parametrize("shape", [(3, 5), (2, 1500), (4099,), (40, 30)])
def test_dropout_is_the_input_times_the_mask_and_saves_one_byte_per_element(cpu_isa: str,
                                                                            shape: tuple[int, ...]) -> None:
    from ami_dist.models.dropout import dropout

    p = 0.3
    x = torch.randn(shape)
    flat = x.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")])  # as x * mask treats them
    if len(shape) == 2 and shape[0] == 40:
        x = x.t()  # not contiguous
    x.requires_grad_(True)
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    torch.manual_seed(11)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dropout(x, p, training=True)
    torch.manual_seed(11)
    mask = keep_mask(tuple(x.shape), p, x)
    want = x.detach() * mask
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    assert torch.equal(out.signbit(), want.signbit())
    assert saved == [torch.uint8], saved  # the keep flags, not a float32 mask
    grad = torch.randn(x.shape)
    out.backward(grad)
    assert torch.equal(x.grad, grad * mask)
    torch.manual_seed(11)
    assert torch.equal(dropout(x.detach(), p, training=True).nan_to_num(), out.detach().nan_to_num())
    assert not torch.equal(dropout(x.detach(), p, training=True).nan_to_num(), out.detach().nan_to_num())


def test_dropout_rejects_p_out_of_range(built_extension) -> None:
    with pytest.raises(RuntimeError, match="p must be in"):
        torch.ops.ami_dist.dropout(torch.ones(3), 1.0, 0)
