"""One training step of each phase: MLE, noise, forward (MLE + adversarial), backward (MLE + adversarial).

Each step trains exactly one engine (both networks in MLE pretraining); the others act as frozen
generator or critic, in eval mode and without gradient. Every engine zeroes its own gradients at its
step, so nothing leaks from one phase into another engine's update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ami_dist import ops
from ami_dist.data.batching import Batch
from ami_dist.distributed.engines import gradient_clipping
from ami_dist.models.seq2seq import EncoderOutput, Seq2Seq
from ami_dist.training.context import Network, Run
from ami_dist.training.losses import sentence_nll
from ami_dist.training.meter import Meter
from ami_dist.training.mle import Update, mle_step
from ami_dist.training.objectives import (
    advantages,
    backward_adversarial_loss,
    demotion_weights,
    forward_adversarial_loss,
    mean_embeddings,
    score_surrogate,
    strength_loss,
)
from ami_dist.training.stages import max_grad_norm
from ami_dist.training.synthetic import (
    NoiseStream,
    Picks,
    Synthetic,
    argmax_targets,
    gold_positions,
    noisy_memory,
    pick,
    rewards,
)

METRICS = [
    "fw/mle_nll", "bw/mle_nll", "fw/adv_loss", "fw/reward", "fw/reward_std", "fw/distinct_samples",
    "bw/real_logq", "bw/synth_logq", "bw/demote_weight", "bw/demoted_fraction", "noise/strength",
    "noise/below_cap", "noise/memory_norm", "noise/loss", "noise/reward", "noise/reward_std", "noise/distinct_samples",
]


@contextmanager
def eval_mode(*engines: Any) -> Iterator[None]:
    """Engines in eval mode (no dropout) for the block, then back to train; gradients are the caller's choice.

    Every pass that picks T̃ runs this way, in all three phases: T̃ then depends on the latent noise alone,
    the one random choice the score-function terms account for (dropout masks would be a second source of
    randomness in T̃ that the rewards then attribute to δ), and it is the model that decodes at test time.
    """
    modes = [e.module.training for e in engines]
    for e in engines:
        e.module.eval()
    try:
        yield
    finally:
        for e, mode in zip(engines, modes, strict=True):
            e.module.train(mode)


def _update(run: Run, name: str, update_clip: float | None = None) -> Update:
    """The guarded backward-and-step of one named update (see :mod:`ami_dist.training.guard`), clipped as the
    stage says (:func:`ami_dist.training.stages.max_grad_norm`)."""
    def update(engine: Any, loss: torch.Tensor) -> bool:
        bound = max_grad_norm(run.stage, run.cfg.ami.adv_max_grad_norm, update_clip)
        if bound is None:
            return run.guard.update(engine, loss, name)
        with gradient_clipping(engine, bound):
            return run.guard.update(engine, loss, name)
    return update


def network_mle(run: Run, name: str, indices: list[int], meter: Meter) -> Batch:
    """One network's MLE update on real pairs; returns its batch (for an adversarial update after it)."""
    net = run.network(name)
    batch = net.batch(indices, run.vocab)
    loss, ntok = mle_step(net.engine, batch, run.vocab.pad_id, run.cfg.train.label_smoothing,
                          _update(run, f"{name} MLE"))
    meter.add(f"{net.short}/mle_nll", float(loss), ntok)
    return batch


def mle_pretrain_step(run: Run, indices: list[int], meter: Meter) -> None:
    """Both networks take an MLE step on the same pairs."""
    for net in run.networks:
        network_mle(run, net.name, indices, meter)


def _noise_mu(run: Run, memory: torch.Tensor) -> torch.Tensor:
    """μ from the noise network, as a frozen module (no gradient into ψ)."""
    with torch.no_grad(), eval_mode(run.noise):
        return run.noise.module(memory.detach())


def _synthesize(run: Run, fw: Network, indices: list[int]) -> Synthetic:
    """T̃ from the frozen forward network over noisy memory banks (no gradient anywhere)."""
    vocab, k = run.vocab, run.cfg.lns.k
    batch = fw.batch(indices, vocab)
    model: Seq2Seq = fw.engine.module
    with torch.no_grad(), eval_mode(fw.engine):
        enc = model.encode(batch.src, batch.src_lengths)
        enc_k, _, _ = noisy_memory(model, enc, _noise_mu(run, enc.memory), k, run.cfg.lns.scale, run.stream)
        return argmax_targets(model, enc_k, batch.tgt_in, batch.tgt_out, vocab.pad_id, vocab.bos_id, vocab.eos_id)


def _rewards(run: Run, bw: Network, synthetic: Synthetic, indices: list[int]) -> torch.Tensor:
    bw_batch = bw.batch(indices, run.vocab)  # its decoder side is the real source S
    with eval_mode(bw.engine):
        return rewards(bw.engine.module, synthetic, bw_batch.tgt_in, bw_batch.tgt_out, run.cfg.lns.k,
                       run.vocab.pad_id, run.vocab.eos_id)


def _sample_spread(meter: Meter, prefix: str, synthetic: Synthetic, reward: torch.Tensor) -> None:
    """How different the K samples of a sentence are: if they seldom differ, every advantage is near 0."""
    k = reward.size(0)
    meter.add(f"{prefix}/distinct_samples", float(synthetic.distinct_per_sentence(k).sum()), reward.size(1))
    spread = reward.std(dim=0, unbiased=False) if k > 1 else torch.zeros_like(reward[0])
    meter.add(f"{prefix}/reward_std", float(spread.sum()), reward.size(1))
    meter.add(f"{prefix}/reward", float(reward.sum()), reward.numel())


@dataclass
class NoiseObjective:
    loss: torch.Tensor  # the noise network's loss (gradient reaches ψ through μ only)
    strength: torch.Tensor  # (K, B, S) ‖δ_k‖ per position
    memory_norm: torch.Tensor  # (B, S) ‖h‖ per position, what s·δ perturbs
    mask: torch.Tensor  # (B, S) True at real source tokens
    advantages: torch.Tensor  # (K, B)
    synthetic: Synthetic
    reward: torch.Tensor  # (K, B)


def noise_objective(run: Run, indices: list[int], mu_of: Callable[[torch.Tensor], torch.Tensor]) -> NoiseObjective:
    """The noise network's loss on a batch: −E[(R − b)·log p(δ | μ, σ)] through ``lns_score_grad`` of exactly the
    draws ``lns_sample`` made, and −β·min(‖δ‖, cap) path-wise through the op. ``mu_of`` maps h to μ."""
    cfg, vocab, k = run.cfg, run.vocab, run.cfg.lns.k
    fw, bw = run.network("forward"), run.network("backward")
    model: Seq2Seq = fw.engine.module
    batch = fw.batch(indices, vocab)
    with eval_mode(fw.engine):
        with torch.no_grad():
            enc = model.encode(batch.src, batch.src_lengths)
        mu = mu_of(enc.memory.detach())  # the one trained network here: gradient reaches ψ through μ
        enc_k, strength, offset = noisy_memory(model, enc, mu, k, cfg.lns.scale, run.stream)
        synthetic = argmax_targets(model, enc_k, batch.tgt_in, batch.tgt_out, vocab.pad_id, vocab.bos_id,
                                   vocab.eos_id)
    reward = _rewards(run, bw, synthetic, indices)
    adv = advantages(reward, cfg.ami.baseline)
    loss = mu.new_zeros(())
    if cfg.ami.strength_term:
        loss = loss + strength_loss(strength, enc.mask, cfg.ami.strength_weight, cfg.ami.strength_cap)
    if cfg.ami.score_term:
        per_position = adv[:, :, None].expand(k, *enc.mask.shape)
        dmu = ops.lns_score_grad(mu.detach(), per_position, run.stream.seed, offset, mask=enc.mask)
        loss = loss + score_surrogate(mu, dmu, k, len(indices))
    return NoiseObjective(loss, strength.detach(), enc.memory.detach().norm(dim=-1), enc.mask, adv, synthetic,
                          reward)


def noise_step(run: Run, indices: list[int], meter: Meter) -> None:
    """Train ψ on one batch (noise pretraining and the noise phases of the cycles alike)."""
    objective = noise_objective(run, indices, run.noise)
    _update(run, "noise")(run.noise, objective.loss)
    real = objective.mask.unsqueeze(0).expand_as(objective.strength)
    meter.add("noise/strength", float(objective.strength[real].sum()), float(real.sum()))
    # The share of positions where the strength term has a gradient (‖δ‖ below the cap): where it is 0, only
    # the score term trains the noise network.
    below = objective.strength[real] < run.cfg.ami.strength_cap
    meter.add("noise/below_cap", float(below.sum()), float(real.sum()))
    # against ‖s·δ‖ = s·noise/strength: how much of h the perturbation leaves
    meter.add("noise/memory_norm", float(objective.memory_norm[objective.mask].sum()), float(objective.mask.sum()))
    meter.add("noise/loss", float(objective.loss.detach()))
    _sample_spread(meter, "noise", objective.synthetic, objective.reward)


@dataclass
class ForwardObjective:
    loss: torch.Tensor  # REINFORCE: mean_k,b (R_k − b)·NLL_θ(T̃_k | S, h̃_k)
    nll: torch.Tensor  # (K, B) length-normalised NLL of T̃ under the pass that chose it (carries the gradient)
    picks: Picks
    reward: torch.Tensor  # (K, B)


def forward_adversarial_objective(run: Run, indices: list[int], batch: Batch | None = None) -> ForwardObjective:
    """The forward network's REINFORCE loss on a batch, with the backward network as critic.

    One engine forward: encode, perturb K times, decode teacher-forced on the gold prefix (eval mode); T̃ is
    the argmax of these logits and the same logits score it, length-normalised, so T̃ is reinforced under the
    distribution it came from (the release's form; no second decode of T̃). ``batch`` is ``indices``' batch
    when the caller has it already.
    """
    cfg, vocab, k = run.cfg, run.vocab, run.cfg.lns.k
    fw, bw = run.network("forward"), run.network("backward")
    batch = batch if batch is not None else fw.batch(indices, vocab)
    inside = gold_positions(batch.tgt_out, k, vocab.pad_id)

    def perturb(model: Seq2Seq, enc: EncoderOutput) -> EncoderOutput:
        return noisy_memory(model, enc, _noise_mu(run, enc.memory), k, cfg.lns.scale, run.stream)[0]

    with eval_mode(fw.engine):
        logits = fw.engine(batch.src, batch.src_lengths, batch.tgt_in.repeat(k, 1), perturb=perturb, positions=inside)
    picks = pick(logits, inside, vocab.pad_id, vocab.bos_id, vocab.eos_id)
    nll = picks.nll(logits, vocab.pad_id).view(k, -1)
    reward = _rewards(run, bw, picks.synthetic, indices)
    return ForwardObjective(forward_adversarial_loss(nll, advantages(reward, cfg.ami.baseline)), nll, picks, reward)


def forward_adversarial(run: Run, indices: list[int], batch: Batch, meter: Meter) -> None:
    """The forward network's REINFORCE update on T̃, with the backward network as critic."""
    objective = forward_adversarial_objective(run, indices, batch)
    _update(run, "forward adversarial", run.cfg.ami.fw_adv_clip)(run.network("forward").engine, objective.loss)
    meter.add("fw/adv_loss", float(objective.loss.detach()))
    _sample_spread(meter, "fw", objective.picks.synthetic, objective.reward)


def forward_step(run: Run, indices: list[int], adversarial: bool, meter: Meter) -> None:
    """One forward-phase batch without accumulation: MLE on real pairs, then with ``adversarial`` REINFORCE on
    T̃ (what the training loop's ``run_step`` does for G = 1; benchmarks time it on its own)."""
    batch = network_mle(run, "forward", indices, meter)
    if adversarial:
        forward_adversarial(run, indices, batch, meter)


def backward_adversarial(run: Run, indices: list[int], real: Batch, meter: Meter) -> None:
    """Demote synthetic pairs (S, T̃) by their own w_k, relative to the real pair."""
    cfg, vocab, k = run.cfg, run.vocab, run.cfg.lns.k
    fw, bw = run.network("forward"), run.network("backward")
    synthetic = _synthesize(run, fw, indices)
    syn_src, syn_lengths = synthetic.as_source(vocab.eos_id)
    model: Seq2Seq = bw.engine.module
    with torch.no_grad():
        emb_real = mean_embeddings(model.src_emb(real.src), real.src, vocab.pad_id)
        emb_syn = mean_embeddings(model.src_emb(syn_src), syn_src, vocab.pad_id)
        weights = demotion_weights(emb_real, emb_syn.view(k, len(indices), -1))
    width = max(real.src.size(1), syn_src.size(1))
    pad = torch.nn.functional.pad
    src = torch.cat([pad(real.src, (0, width - real.src.size(1)), value=vocab.pad_id),
                     pad(syn_src, (0, width - syn_src.size(1)), value=vocab.pad_id)])
    lengths = torch.cat([real.src_lengths, syn_lengths])
    # Real and synthetic pairs in one engine forward: rows 0..B-1 real, then sample-major synthetic.
    logits = bw.engine(src, lengths, torch.cat([real.tgt_in, real.tgt_in.repeat(k, 1)]))
    nll = sentence_nll(logits, torch.cat([real.tgt_out, real.tgt_out.repeat(k, 1)]), vocab.pad_id,
                       length_normalise=True)
    real_nll, syn_nll = nll[: len(indices)], nll[len(indices):].view(k, len(indices))
    margin = cfg.ami.demotion_margin if cfg.ami.demotion == "bounded" else None
    adv_loss = backward_adversarial_loss(real_nll, syn_nll, weights, margin)
    _update(run, "backward adversarial", cfg.ami.bw_adv_clip)(bw.engine, adv_loss)
    meter.add("bw/real_logq", float(-real_nll.detach().sum()), len(indices))
    meter.add("bw/synth_logq", float(-syn_nll.detach().sum()), syn_nll.numel())
    meter.add("bw/demote_weight", float(weights.sum()), weights.numel())
    if margin is not None:  # how many synthetic pairs are still inside the margin (and so still demoted)
        inside_margin = syn_nll.detach() < real_nll.detach()[None] + margin
        meter.add("bw/demoted_fraction", float(inside_margin.sum()), inside_margin.numel())


def make_stream(seed: int, rank: int) -> NoiseStream:
    """The rank's latent-noise stream: the rank is folded into the 64-bit seed."""
    return NoiseStream((seed * 1_000_003 + rank) % (1 << 64))
