"""The fused LNS op against its PyTorch reference: values, gradients, masking, dispatcher contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ami_dist import ops
from ami_dist.ops import fused, reference

pytestmark = pytest.mark.usefixtures("built_extension")

# Row lengths that are and are not multiples of 4, and one longer than the CPU tile (1024).
SHAPES = [(5,), (3, 7), (2, 3, 13), (4, 2, 64), (2, 1030)]
# Tolerances for fused vs reference. float32/64: the kernels' ε is float32 (~3e-7 relative).
# float16/bfloat16: both sides compute in float32 and round once, so they differ by <= 1 ulp.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 2e-6, "atol": 2e-6},
    torch.bfloat16: {"rtol": 2.0**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2.0**-10, "atol": 1e-5},
}


def make_inputs(shape, dtype=torch.float32, seed=0, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g).to(dtype)
    mu = (torch.randn(shape, generator=g) * 2).to(dtype)
    mask = None
    if with_mask:
        mask = torch.rand(shape[:-1], generator=g) > 0.3
        if mask.numel():
            mask.view(-1)[0] = False  # at least one padding row
    return h, mu, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, k, dtype, cpu_isa):
    for with_mask, offset in ((False, 0), (True, 6)):
        h, mu, mask = make_inputs(shape, dtype, with_mask=with_mask)
        got = fused.lns_sample(h, mu, k, 0.1, 31337, offset, mask)
        want = reference.lns_sample(h, mu, k, 0.1, 31337, offset, mask)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == dtype
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, **TOL[dtype])
        assert got[0].shape == (k, *shape)
        assert got[1].shape == (k, *shape[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("shape", [(3, 7), (4, 2, 64), (2, 1030)], ids=str)
def test_gradients_match_reference(shape, k, dtype, cpu_isa):
    h, mu, mask = make_inputs(shape, dtype)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn((k, *shape), generator=g).to(dtype)
    grad_strength = torch.randn((k, *shape[:-1]), generator=g).to(dtype)
    grads = []
    for impl in (fused, reference):
        hh, mm = h.clone().requires_grad_(), mu.clone().requires_grad_()
        out = impl.lns_sample(hh, mm, k, 0.1, 5, 8, mask)
        grads.append(torch.autograd.grad(out, (hh, mm), (grad_out, grad_strength)))
    # dh is a sum of K upstream grads; dmu also goes through ‖δ‖, so allow a few ulp in bf16.
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2.0**-6, "atol": 1e-3}
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("used", ["h_noisy", "strength"])
def test_gradient_when_only_one_output_is_used(used):
    # The autograd wiring passes None for an unused output's gradient; both branches of the
    # kernel (no grad_h_noisy, no grad_strength) must still give the reference's gradient.
    h, mu, mask = make_inputs((3, 4, 9), torch.float64)
    grads = []
    for impl in (fused, reference):
        hh, mm = h.clone().requires_grad_(), mu.clone().requires_grad_()
        h_noisy, strength = impl.lns_sample(hh, mm, 3, 0.1, 11, 0, mask)
        loss = (h_noisy * h_noisy).sum() if used == "h_noisy" else strength.sum()
        grads.append(torch.autograd.grad(loss, (hh, mm), allow_unused=True))
    (fh, fm), (rh, rm) = grads
    if used == "strength":
        assert fh is None or torch.count_nonzero(fh) == 0
        assert rh is None or torch.count_nonzero(rh) == 0
    else:
        torch.testing.assert_close(fh, rh, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(fm, rm, rtol=2e-6, atol=2e-6)
    assert torch.count_nonzero(fm) > 0


@pytest.mark.parametrize(
    ("shape", "k", "offset", "with_mask"),
    [((2, 3, 5), 3, 0, True), ((4, 7), 1, 2, False), ((1, 6), 2, 4, True)],
)
@pytest.mark.parametrize("impl", [fused, reference], ids=["fused", "reference"])
def test_gradcheck_float64(impl, shape, k, offset, with_mask):
    h, mu, mask = make_inputs(shape, torch.float64, with_mask=with_mask)
    h.requires_grad_()
    mu.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: impl.lns_sample(a, b, k, 0.3, 77, offset, mask), (h, mu))


def test_opcheck_lns_sample():
    for dtype in (torch.float32, torch.bfloat16):
        h, mu, mask = make_inputs((3, 2, 6), dtype)
        h.requires_grad_()
        mu.requires_grad_()
        torch.library.opcheck(torch.ops.ami_dist.lns_sample.default, (h, mu, 3, 0.1, 9, 4, mask))
    h, mu, _ = make_inputs((5, 8), torch.float32)
    torch.library.opcheck(torch.ops.ami_dist.lns_sample.default, (h.requires_grad_(), mu, 2, 0.5, 1, 0, None))


def test_opcheck_backward_and_score_grad():
    h, mu, mask = make_inputs((3, 2, 6), torch.float32)
    _, _, norms = torch.ops.ami_dist.lns_sample(h, mu, 2, 0.1, 9, 4, mask)
    g = torch.randn(2, 3, 2, 6)
    gs = torch.randn(2, 3, 2)
    for grads in ((g, gs), (None, gs), (g, None)):
        torch.library.opcheck(
            torch.ops.ami_dist.lns_sample_backward.default, (*grads, mu, norms, mask, 2, 0.1, 9, 4)
        )
    rewards = torch.randn(2, 3, 2)
    torch.library.opcheck(torch.ops.ami_dist.lns_score_grad.default, (mu, rewards, 9, 4, mask))
    torch.library.opcheck(torch.ops.ami_dist.lns_score_grad.default, (mu, rewards, 9, 4, None))


def test_same_seed_and_offset_repeat_and_other_offsets_or_seeds_differ():
    h, mu, mask = make_inputs((4, 3, 16))
    first = fused.lns_sample(h, mu, 5, 0.1, 42, 100, mask)
    again = fused.lns_sample(h, mu, 5, 0.1, 42, 100, mask)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    real = mask.unsqueeze(-1).expand_as(h)
    for other in (fused.lns_sample(h, mu, 5, 0.1, 42, 104, mask), fused.lns_sample(h, mu, 5, 0.1, 43, 100, mask)):
        changed = (other[0] != first[0])[:, real]
        assert changed.float().mean() > 0.99


def test_next_offset_moves_to_fresh_draws():
    # Two consecutive calls with next_offset read consecutive, non-overlapping parts of the stream.
    shape, k, seed = (3, 5), 3, 8
    n = math.prod(shape)
    zeros = torch.zeros(shape, dtype=torch.float64)
    o1 = 12
    o2 = ops.next_offset(o1, k, n)
    assert o2 % 4 == 0 and 0 <= o2 - o1 - k * n < 4
    e1 = fused.lns_sample(zeros, zeros, k, 1.0, seed, o1)[0] / math.log(2.0)
    e2 = fused.lns_sample(zeros, zeros, k, 1.0, seed, o2)[0] / math.log(2.0)
    stream = fused.normal_stream(seed, o1, o2 - o1 + k * n).double()
    torch.testing.assert_close(e1.flatten(), stream[: k * n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e2.flatten(), stream[o2 - o1 :], rtol=1e-6, atol=1e-6)


def test_next_offset_rounding():
    assert ops.next_offset(0, 5, 7) == 36  # 35 draws, rounded up to a multiple of 4
    assert ops.next_offset(8, 1, 8) == 16  # already a multiple of 4
    assert ops.next_offset(2**64 - 4, 1, 4) == 0  # uint64 draw indices wrap
    with pytest.raises(ValueError, match="k >= 1"):
        ops.next_offset(0, 0, 4)


def test_backward_saves_o_of_mu_not_epsilon():
    k, shape = 5, (6, 4, 64)
    h, mu, mask = make_inputs(shape)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused.lns_sample(h, mu.requires_grad_(), k, 0.1, 1, 0, mask)
    # mu, the per-row norms and the mask; ε (k·|mu|) would be five times mu alone.
    assert sum(saved.values()) <= mu.nbytes + k * mask.numel() * 4 + mask.numel()


@pytest.mark.parametrize("impl", [fused, reference], ids=["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_gets_no_noise_no_strength_and_no_gradient(impl, dtype, cpu_isa):
    k, shape = 4, (5, 3, 10)
    h, mu, mask = make_inputs(shape, dtype)
    hh, mm = h.clone().requires_grad_(), mu.clone().requires_grad_()
    h_noisy, strength = impl.lns_sample(hh, mm, k, 0.5, 3, 0, mask)
    pad = ~mask
    assert pad.any() and mask.any()
    assert torch.equal(h_noisy[:, pad], h[pad].expand(k, -1, -1))
    assert torch.count_nonzero(strength[:, pad]) == 0
    assert torch.all(strength[:, mask] > 0)
    grad_out = torch.randn(h_noisy.shape).to(dtype)
    dh, dmu = torch.autograd.grad((h_noisy, strength), (hh, mm), (grad_out, torch.ones_like(strength)))
    assert torch.count_nonzero(dmu[pad]) == 0
    assert torch.count_nonzero(dmu[mask]) > 0
    torch.testing.assert_close(dh[pad], grad_out[:, pad].float().sum(0).to(dtype), **TOL[dtype])
    # Real rows are unaffected by the mask.
    unmasked = impl.lns_sample(h, mu, k, 0.5, 3, 0)
    assert torch.equal(h_noisy[:, mask].detach(), unmasked[0][:, mask])


def score_grad_by_autograd(mu, rewards, seed, offset, mask):
    """∂/∂μ Σ_k r_k log N(δ_k; μ, softplus(μ)) with δ_k the reference's draws, held fixed."""
    k = rewards.shape[0]
    eps = reference.normal_stream(seed, offset, k * mu.numel()).reshape((k, *mu.shape))
    m = mu.detach().double().requires_grad_()
    sigma = F.softplus(m)
    delta = (m + sigma * eps).detach()
    logp = torch.distributions.Normal(m, sigma).log_prob(delta).sum(-1)
    r = rewards.double() if mask is None else rewards.double() * mask.double()
    (grad,) = torch.autograd.grad((r * logp).sum(), m)
    return grad


@pytest.mark.parametrize(
    ("impl", "dtype"),
    [(fused, torch.float64), (reference, torch.float64), (fused, torch.float32), (reference, torch.float32)],
    ids=["fused-f64", "reference-f64", "fused-f32", "reference-f32"],
)
@pytest.mark.parametrize("with_mask", [False, True])
def test_score_grad_is_autograd_of_gaussian_log_density(impl, dtype, with_mask, cpu_isa):
    shape, k = (3, 4, 13), 5
    _, mu, mask = make_inputs(shape, dtype, with_mask=with_mask)
    mu = mu.clamp(-4, 4)  # keep σ away from 0 so that ε/σ is well conditioned
    rewards = torch.randn((k, *shape[:-1]), generator=torch.Generator().manual_seed(3))
    want = score_grad_by_autograd(mu, rewards, 17, 20, mask)
    got = impl.lns_score_grad(mu, rewards, 17, 20, mask)
    assert got.dtype == dtype
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(got.double(), want, **tol)
    if with_mask:
        assert torch.count_nonzero(got[~mask]) == 0


def test_score_grad_bfloat16_matches_reference():
    _, mu, mask = make_inputs((2, 3, 9), torch.bfloat16)
    rewards = torch.randn(4, 2, 3)
    got = fused.lns_score_grad(mu, rewards, 1, 0, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.lns_score_grad(mu, rewards, 1, 0, mask), rtol=2.0**-7, atol=1e-4)


def test_empty_inputs():
    for shape in ((0, 4), (3, 0)):
        h = torch.zeros(shape)
        h_noisy, strength = fused.lns_sample(h, h, 2, 0.1, 0, 0)
        assert h_noisy.shape == (2, *shape) and strength.shape == (2, *shape[:-1])
        assert torch.count_nonzero(strength) == 0
        assert fused.lns_score_grad(h, torch.zeros(2, *shape[:-1]), 0, 0).shape == shape


# Bad inputs through the Python face (both implementations share the checks).
def _bad_calls():
    h, mu, mask = make_inputs((2, 3, 4))
    r = torch.randn(2, 2, 3)
    sample = ops.lns_sample
    return [
        ("int dtype", lambda: sample(h.long(), mu.long(), 2, 0.1, 0, 0), TypeError, "float16, bfloat16"),
        ("mixed dtype", lambda: sample(h.double(), mu, 2, 0.1, 0, 0), TypeError, "same dtype"),
        ("shape mismatch", lambda: sample(h[:, :2], mu, 2, 0.1, 0, 0), ValueError, "same shape"),
        ("k = 0", lambda: sample(h, mu, 0, 0.1, 0, 0), ValueError, r"k \(the number of samples\) must be >= 1"),
        ("k float", lambda: sample(h, mu, 2.0, 0.1, 0, 0), TypeError, "must be an int"),
        ("h non-contiguous", lambda: sample(h.transpose(0, 1), mu.transpose(0, 1).contiguous(), 2, 0.1, 0, 0),
         ValueError, "h must be contiguous"),
        ("mu non-contiguous", lambda: sample(h.transpose(0, 1).contiguous(), mu.transpose(0, 1), 2, 0.1, 0, 0),
         ValueError, "mu must be contiguous"),
        ("devices differ", lambda: sample(h.to("meta"), mu, 2, 0.1, 0, 0), ValueError, "same device"),
        ("mask dtype", lambda: sample(h, mu, 2, 0.1, 0, 0, mask.float()), TypeError, "mask must be a bool"),
        ("mask shape", lambda: sample(h, mu, 2, 0.1, 0, 0, mask[:, :2]), ValueError, r"mask must have shape \(2, 3\)"),
        ("mask device", lambda: sample(h, mu, 2, 0.1, 0, 0, mask.to("meta")), ValueError, "mask must be on cpu"),
        ("seed negative", lambda: sample(h, mu, 2, 0.1, -1, 0), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        ("offset too big", lambda: sample(h, mu, 2, 0.1, 0, 2**64), ValueError, r"offset must be in \[0, 2\*\*64\)"),
        ("lam string", lambda: sample(h, mu, 2, "0.1", 0, 0), TypeError, "lam must be a float"),
        ("rewards shape", lambda: ops.lns_score_grad(mu, r[:, :1], 0, 0), ValueError,
         r"rewards must have shape \(k,\) \+ mu.shape\[:-1\] = \(k, 2, 3\)"),
        ("rewards int", lambda: ops.lns_score_grad(mu, r.long(), 0, 0), TypeError, "floating-point"),
        ("score mu dtype", lambda: ops.lns_score_grad(mu.half().int(), r, 0, 0), TypeError, "mu must be float16"),
    ]  # fmt: skip


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_clear_errors(impl, case):
    ops.set_impl(impl)
    _name, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# The same mistakes straight through the dispatcher hit the C++ TORCH_CHECKs.
def _bad_dispatcher_calls():
    h, mu, mask = make_inputs((2, 3, 4))
    op = torch.ops.ami_dist.lns_sample
    _, _, norms = op(h, mu, 2, 0.1, 0, 0, mask)
    bwd = torch.ops.ami_dist.lns_sample_backward
    g = torch.randn(2, 2, 3, 4)
    return [
        (lambda: op(h.long(), mu.long(), 2, 0.1, 0, 0, None), "mu must be float16, bfloat16, float32 or float64"),
        (lambda: op(h.double(), mu, 2, 0.1, 0, 0, None), "h and mu must have the same dtype"),
        (lambda: op(h[:, :2].contiguous(), mu, 2, 0.1, 0, 0, None), "h and mu must have the same shape"),
        (lambda: op(h, mu, 0, 0.1, 0, 0, None), "k must be >= 1"),
        (lambda: op(h.transpose(0, 1), mu.transpose(0, 1).contiguous(), 2, 0.1, 0, 0, None), "h must be contiguous"),
        (lambda: op(h, mu, 2, 0.1, 0, 0, mask.int()), "mask must be a bool tensor"),
        (lambda: op(h, mu, 2, 0.1, 0, 0, mask[:1]), r"mask must have shape \[2, 3\]"),
        (lambda: bwd(g, None, mu, norms.double(), mask, 2, 0.1, 0, 0), "norms must have dtype Float"),
        (lambda: bwd(g[:1], None, mu, norms, mask, 2, 0.1, 0, 0), r"grad_h_noisy must have shape \[2, 2, 3, 4\]"),
        (lambda: torch.ops.ami_dist.lns_score_grad(mu, torch.randn(2, 3, 2), 0, 0, None),
         r"rewards must have shape \[2, 2, 3\]"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_dispatcher_calls())))
def test_bad_inputs_raise_clear_errors_in_cpp(case):
    call, match = _bad_dispatcher_calls()[case]
    with pytest.raises(RuntimeError, match=match):
        call()
