"""The AMI objectives on tiny hand-checkable cases (DESIGN §2)."""

from __future__ import annotations

import pytest
import torch

from ami_dist import ops
from ami_dist.models import ModelConfig, build_model
from ami_dist.models.noise import NoiseNetwork
from ami_dist.training.losses import sentence_nll
from ami_dist.training.objectives import (
    advantages,
    backward_adversarial_loss,
    demotion_weights,
    forward_adversarial_loss,
    mean_embeddings,
    strength_loss,
)

V, PAD, BOS, EOS = 20, 0, 2, 3


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(emb_dim=8, hidden_size=8, enc_layers=1, dec_layers=1, dropout=0.0, input_feed=False)
    return build_model(cfg, V, PAD)


def _seq_nll(model: torch.nn.Module, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """NLL of whole sentences tgt (N, T) given src (N, S); BOS/EOS added here."""
    n = tgt.size(0)
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt], dim=1)
    tgt_out = torch.cat([tgt, torch.full((n, 1), EOS)], dim=1)
    return sentence_nll(model(src, torch.full((n,), src.size(1)), tgt_in), tgt_out, PAD)


def test_advantages_subtract_the_mean_over_samples() -> None:
    rewards = torch.tensor([[1.0, -2.0], [3.0, -4.0]])  # (K=2, B=2)
    assert advantages(rewards, baseline=True).tolist() == [[-1.0, 1.0], [1.0, -1.0]]
    assert torch.equal(advantages(rewards, baseline=False), rewards)


@pytest.mark.parametrize("baseline", [True, False])
def test_reinforce_step_favours_the_higher_reward_sample(baseline: bool) -> None:
    model = _model()
    src = torch.tensor([[5, 6, 7]]).repeat(2, 1)
    samples = torch.tensor([[8, 9], [10, 11]])  # two synthetic targets T̃_1, T̃_2 for the same source
    rewards = torch.tensor([[-1.0], [-3.0]])  # (K=2, B=1): the first reconstructs the source better
    with torch.no_grad():
        before = _seq_nll(model, src, samples)
    loss = forward_adversarial_loss(_seq_nll(model, src, samples).view(2, 1), advantages(rewards, baseline))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
        after = _seq_nll(model, src, samples)
    gain = (before - after)  # rise in log p of each sample
    assert gain[0] > gain[1], f"log p gains {gain.tolist()}"
    if baseline:
        assert gain[0] > 0 > gain[1]


def test_reinforce_ignores_samples_with_equal_rewards_under_the_baseline() -> None:
    nll = torch.tensor([[2.0], [5.0]], requires_grad=True)
    forward_adversarial_loss(nll, advantages(torch.tensor([[-1.5], [-1.5]]), baseline=True)).backward()
    assert torch.equal(nll.grad, torch.zeros_like(nll))


def test_demotion_weights_are_per_sentence() -> None:
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # ē(T) for B=2
    synthetic = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # K=1: sentence 0 equal to T, sentence 1 orthogonal
    w = demotion_weights(real, synthetic)
    assert w.shape == (1, 2)
    assert w[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, 1].item() == pytest.approx(1.0)
    # each synthetic NLL is weighted by its own w (the official release broadcast [N] x [N,1])
    syn = torch.tensor([[10.0, 4.0]], requires_grad=True)
    backward_adversarial_loss(torch.zeros(2), syn, w).backward()
    assert syn.grad[0].tolist() == pytest.approx([0.0, -0.5], abs=1e-6)
    with pytest.raises(ValueError, match="must match"):
        backward_adversarial_loss(torch.zeros(2), syn, w.view(2, 1))


def test_mean_embeddings_ignore_padding() -> None:
    ids = torch.tensor([[4, 5, PAD]])
    embedded = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])
    assert mean_embeddings(embedded, ids, PAD).tolist() == [[2.0, 3.0]]


def _logq(model: torch.nn.Module, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return -_seq_nll(model, src, tgt)


def test_demotion_lowers_logq_of_a_synthetic_pair_but_not_of_a_copy_of_the_real_one() -> None:
    t_real = torch.tensor([[5, 6, 7]])
    t_synth = torch.tensor([[12, 13, 14]])
    s = torch.tensor([[8, 9]])

    def after_step(t_syn: torch.Tensor, demote: bool) -> tuple[float, float]:
        """log q(S | T̃) and log q(S | T) after one step of L_bw (or of MLE alone) on a fresh q."""
        model = _model(1)  # q(S | T): reads T, writes S
        with torch.no_grad():
            emb = model.src_emb
            w = demotion_weights(mean_embeddings(emb(t_real), t_real, PAD),
                                 mean_embeddings(emb(t_syn), t_syn, PAD).unsqueeze(0))
        real_nll = _seq_nll(model, t_real, s)
        loss = backward_adversarial_loss(real_nll, _seq_nll(model, t_syn, s).view(1, 1), w) if demote \
            else real_nll.mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
            return float(_logq(model, t_syn, s)), float(_logq(model, t_real, s))

    mle_synth, _ = after_step(t_synth, demote=False)
    demoted_synth, _ = after_step(t_synth, demote=True)
    assert demoted_synth < mle_synth - 0.05  # the synthetic pair is pushed down relative to plain MLE
    # T̃ = T has weight 0: the step is exactly the MLE step, the real pair is not demoted
    assert after_step(t_real, demote=True) == pytest.approx(after_step(t_real, demote=False), abs=1e-6)


def _strength_after_steps(cap: float, steps: int = 5) -> tuple[float, float, torch.Tensor]:
    torch.manual_seed(0)
    noise = NoiseNetwork(16, 16)
    h = torch.randn(2, 3, 16)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    opt = torch.optim.SGD(noise.parameters(), lr=0.5)
    strengths = []
    for step in range(steps + 1):
        mu = noise(h)
        _, strength = ops.lns_sample(h, mu, 4, 0.1, seed=11, offset=0, mask=mask)  # same ε every step
        strengths.append(float(strength[:, mask].mean()))
        if step < steps:
            opt.zero_grad()
            strength_loss(strength, mask, weight=1.0, cap=cap).backward()
            opt.step()
    return strengths[0], strengths[-1], strength


def test_strength_term_raises_strength_below_the_cap() -> None:
    first, last, strength = _strength_after_steps(cap=1e6)
    assert last > first * 1.5
    assert torch.all(strength[:, 1, 2] == 0)  # padding gets no noise


def test_strength_term_stops_above_the_cap() -> None:
    first, last, _ = _strength_after_steps(cap=0.1)  # every ‖δ‖ (about 2.7 here) is above the cap
    assert last == pytest.approx(first, rel=1e-6)


def test_strength_loss_ignores_padding() -> None:
    mask = torch.tensor([[True, False]])
    a = torch.tensor([[[2.0, 0.0]]])
    b = torch.tensor([[[2.0, 50.0]]])
    assert strength_loss(a, mask, 1.0, 10.0) == strength_loss(b, mask, 1.0, 10.0) == -2.0
