"""Losses ignore padding; the learning-rate schedule follows the paper's step decays."""

from __future__ import annotations

import math

import pytest
import torch

from ami_dist.config.schema import OptimConfig
from ami_dist.training.losses import sentence_nll, token_nll
from ami_dist.training.optim import build_optimizer, step_decay


def test_token_nll_ignores_padding() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    target = torch.tensor([[1, 0]])  # second position is padding (id 0)
    loss, ntok = token_nll(logits, target, pad_id=0)
    assert int(ntok) == 1
    assert float(loss) == pytest.approx(-math.log(0.25))


def test_sentence_nll_sums_and_normalises() -> None:
    probs = torch.tensor([[[0.1, 0.6, 0.3], [0.1, 0.2, 0.7]], [[0.1, 0.5, 0.4], [0.1, 0.5, 0.4]]])
    target = torch.tensor([[1, 2], [2, 0]])
    nll = sentence_nll(probs.log(), target, pad_id=0)
    assert nll.tolist() == pytest.approx([-math.log(0.6) - math.log(0.7), -math.log(0.4)])
    normalised = sentence_nll(probs.log(), target, pad_id=0, length_normalise=True)
    assert normalised.tolist() == pytest.approx([(-math.log(0.6) - math.log(0.7)) / 2, -math.log(0.4)])


def test_dialog_schedule_from_the_paper() -> None:
    # ×0.95 every 5,000 steps from step 15,000
    assert step_decay(14999, 15000, 5000, 0.95) == 1.0
    assert step_decay(15000, 15000, 5000, 0.95) == pytest.approx(0.95)
    assert step_decay(19999, 15000, 5000, 0.95) == pytest.approx(0.95)
    assert step_decay(20000, 15000, 5000, 0.95) == pytest.approx(0.95**2)


def test_nmt_schedule_halves_every_17k_after_170k() -> None:
    assert step_decay(169_999, 170_000, 17_000, 0.5) == 1.0
    assert step_decay(170_000, 170_000, 17_000, 0.5) == 0.5
    assert step_decay(204_000, 170_000, 17_000, 0.5) == 0.125


def test_scheduler_applies_the_decay_to_the_optimizer() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimizer([param], OptimConfig(lr=1.0, decay_start=3, decay_every=2, decay_factor=0.5), 512)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])  # the LR used by this (1-based) step
        opt.step()
        sched.step()
    assert seen == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_noam_warms_up_then_decays_with_the_inverse_square_root() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="adam", lr=2.0, schedule="noam", warmup_steps=4, adam_beta2=0.998, adam_eps=1e-9)
    opt, sched = build_optimizer([param], cfg, 512)
    assert opt.param_groups[0]["betas"] == (0.9, 0.998) and opt.param_groups[0]["eps"] == 1e-9
    seen = []
    for _ in range(16):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = 2.0 * 512**-0.5 * 4**-0.5  # at the end of warm-up
    assert seen[3] == pytest.approx(peak)
    assert seen[0] == pytest.approx(peak / 4)  # linear warm-up: step 1 of 4
    assert seen[15] == pytest.approx(peak / 2)  # step 16 = 4 x warm-up: lr halves
    assert seen[:4] == sorted(seen[:4]) and seen[3:] == sorted(seen[3:], reverse=True)


def test_adam_is_the_fused_kernel_and_matches_the_reference_update() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    reference = [torch.nn.Parameter(w.clone()) for w in weights]
    cfg = OptimConfig(name="adam", lr=0.01, adam_beta2=0.998, adam_eps=1e-9, weight_decay=0.01)
    opt, _ = build_optimizer(ours, cfg, 512)
    assert opt.defaults["fused"]
    ref = torch.optim.Adam(reference, lr=0.01, betas=(0.9, 0.998), eps=1e-9, weight_decay=0.01, foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((ours, opt), (reference, ref)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adversarial_stage_switches_the_learning_rate_at_once_and_back() -> None:
    from ami_dist.training.schedule import Stage
    from ami_dist.training.stages import set_stage

    param = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(name="sgd", lr=1.0, decay_start=3, decay_every=2, decay_factor=0.5)
    optimizer, scheduler = build_optimizer([param], cfg, model_dim=8, adv_lr=0.01)

    def lr() -> float:
        return optimizer.param_groups[0]["lr"]

    def step() -> None:
        optimizer.step()
        scheduler.step()

    step()
    step()  # two steps done: the third uses the first decay
    assert lr() == pytest.approx(0.5)
    set_stage([scheduler], Stage.NOISE_PRETRAIN)
    assert lr() == pytest.approx(0.5)  # noise pretraining does not touch the forward/backward networks' rates
    set_stage([scheduler], Stage.ADVERSARIAL)
    assert lr() == pytest.approx(0.01)  # for the very next update, not one step late
    step()
    step()
    assert lr() == pytest.approx(0.01)  # constant through the stage
    set_stage([scheduler], Stage.MLE)
    assert lr() == pytest.approx(0.25)  # the schedule resumes where the step count is
    # what the scheduler saves in a checkpoint holds no trace of the stage (it is derived from the step)
    state = scheduler.state_dict()
    assert set(state) >= {"base_lrs", "last_epoch"} and all(not callable(v) for v in state.values())
    assert state["lr_lambdas"] == [None]
    _, plain = build_optimizer([param], cfg, model_dim=8)  # adv_lr 0: the schedule goes on in every stage
    set_stage([plain], Stage.ADVERSARIAL)
    assert plain.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)


def test_adversarial_stage_bounds_every_update_and_the_smaller_bound_wins() -> None:
    from ami_dist.training.schedule import Stage
    from ami_dist.training.stages import max_grad_norm

    assert max_grad_norm(Stage.MLE, 0.1) is None  # the engine's own optim.max_grad_norm
    assert max_grad_norm(Stage.NOISE_PRETRAIN, 0.1) is None
    assert max_grad_norm(Stage.ADVERSARIAL, 0.1) == 0.1
    assert max_grad_norm(Stage.ADVERSARIAL, 0.0) is None
    assert max_grad_norm(Stage.ADVERSARIAL, 0.1, update_clip=1.0) == 0.1  # the release: 1.0, then the optimizer's 0.1
    assert max_grad_norm(Stage.ADVERSARIAL, 2.0, update_clip=1.0) == 1.0
    assert max_grad_norm(Stage.ADVERSARIAL, 0.1, update_clip=0.0) == 0.1
    assert max_grad_norm(None, 0.1, update_clip=0.0) == 0.0  # an adversarial update's "no clipping" outside it
