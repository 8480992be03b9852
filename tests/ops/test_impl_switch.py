"""The auto/fused/reference switch and the fallback when the extension is not built."""

from __future__ import annotations

import warnings

import pytest
import torch

from ami_dist import ops
from ami_dist.ops import fused, reference


@pytest.fixture
def extension_absent(monkeypatch):
    """Pretend ami_dist._C failed to import, and forget earlier fallback warnings."""
    monkeypatch.setattr(fused, "_LOAD_ERROR", ImportError("simulated: no module named ami_dist._C"))
    monkeypatch.setattr(ops, "_fallback_warned", set())


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)


def test_set_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="auto, fused, reference"):
        ops.set_impl("cuda")
    assert ops.get_impl() == "auto"


def test_auto_falls_back_to_reference_and_warns_once(extension_absent):
    ops.set_impl("auto")
    h, mu = _inputs()
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference.*not built") as record:
        first = ops.lns_sample(h, mu, 2, 0.1, 5, 0)
        second = ops.lns_sample(h, mu, 2, 0.1, 5, 0)
        ops.lns_score_grad(mu, torch.randn(2, 3), 5, 0)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    want = reference.lns_sample(h, mu, 2, 0.1, 5, 0)
    for got in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_fused_errors_clearly_when_extension_absent(extension_absent):
    ops.set_impl("fused")
    h, mu = _inputs()
    with pytest.raises(RuntimeError, match=r"'fused' was requested.*not built.*pip install"):
        ops.lns_sample(h, mu, 2, 0.1, 5, 0)
    with pytest.raises(RuntimeError, match="not built"):
        ops.lns_score_grad(mu, torch.randn(2, 3), 5, 0)


@pytest.mark.usefixtures("built_extension")
def test_auto_uses_fused_without_warning_when_built(monkeypatch):
    calls = []
    real = fused.lns_sample
    monkeypatch.setattr(fused, "lns_sample", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ops.set_impl("auto")
    h, mu = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.lns_sample(h, mu, 2, 0.1, 5, 0)
    assert calls == [1]


@pytest.mark.usefixtures("built_extension")
def test_reference_is_used_when_selected(monkeypatch):
    calls = []
    real = reference.lns_score_grad
    monkeypatch.setattr(reference, "lns_score_grad", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(fused, "lns_score_grad", lambda *a, **kw: pytest.fail("fused used"))
    ops.set_impl("reference")
    _, mu = _inputs()
    ops.lns_score_grad(mu, torch.randn(2, 3), 5, 0)
    assert calls == [1]


@pytest.mark.usefixtures("built_extension")
def test_device_without_kernels_falls_back_or_errors(monkeypatch):
    # As for CUDA tensors with a CPU-only build: auto warns and uses the reference, fused refuses.
    monkeypatch.setattr(fused, "has_kernel_for", lambda device: False)
    monkeypatch.setattr(ops, "_fallback_warned", set())
    h, mu = _inputs()
    ops.set_impl("auto")
    with pytest.warns(RuntimeWarning, match="no kernels for cpu"):
        ops.lns_sample(h, mu, 1, 0.1, 0, 0)
    ops.set_impl("fused")
    with pytest.raises(RuntimeError, match="no kernels for cpu tensors"):
        ops.lns_sample(h, mu, 1, 0.1, 0, 0)
