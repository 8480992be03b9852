"""Inverted dropout drawn with torch.rand: keep rate, scale, identity in evaluation, gradient through the mask."""

from __future__ import annotations

import pytest
import torch

from ami_dist.models.dropout import Dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_mask_keeps_one_minus_p_scaled(p: float) -> None:
    torch.manual_seed(0)
    mask = keep_mask((200, 500), p, torch.empty(0))
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
    assert abs(float((mask > 0).float().mean()) - (1 - p)) < 0.01
    assert abs(float(mask.mean()) - 1.0) < 0.02  # unbiased: E[mask] = 1


def test_dropout_module() -> None:
    layer = Dropout(0.3)
    x = torch.randn(64, 100, requires_grad=True)
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert not torch.equal(layer(x), y)  # a new mask every call
    layer.eval()
    assert layer(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
