"""One training step of each phase: MLE, noise, forward (MLE + adversarial), backward (MLE + adversarial).

Each step trains exactly one engine (both networks in MLE pretraining); the others act as frozen
generator or critic, in eval mode and without gradient. Every engine zeroes its own gradients at its
step, so nothing leaks from one phase into another engine's update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ami_dist import ops
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
from ami_dist.training.synthetic import NoiseStream, Synthetic, argmax_targets, noisy_memory, rewards

METRICS = [
    "fw/mle_nll", "bw/mle_nll", "fw/adv_loss", "fw/reward", "bw/real_logq", "bw/synth_logq",
    "bw/demote_weight", "noise/strength", "noise/score_loss", "noise/reward",
]
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@contextmanager
def frozen(*engines: Any) -> Iterator[None]:
    """Engines used as generator or critic: eval mode (no dropout) for the block, then back to train."""
    modes = [e.module.training for e in engines]
    for e in engines:
        e.module.eval()
    try:
        yield
    finally:
        for e, mode in zip(engines, modes, strict=True):
            e.module.train(mode)


def _update(run: Run, name: str) -> Update:
    """The guarded backward-and-step of one named update (see :mod:`ami_dist.training.guard`)."""
    return lambda engine, loss: run.guard.update(engine, loss, name)


def mle_pretrain_step(run: Run, indices: list[int], meter: Meter) -> None:
    """Both networks take an MLE step on the same pairs."""
    for net in run.networks:
        loss, ntok = mle_step(net.engine, net.batch(indices, run.vocab), run.vocab.pad_id,
                              run.cfg.train.label_smoothing, _update(run, f"{net.name} MLE"))
        meter.add(f"{net.short}/mle_nll", float(loss), ntok)


def _noise_mu(run: Run, memory: torch.Tensor) -> torch.Tensor:
    """μ from the noise network, as a frozen module (no gradient into ψ)."""
    with torch.no_grad(), frozen(run.noise):
        return run.noise.module(memory.detach())


def _synthesize(run: Run, fw: Network, indices: list[int]) -> Synthetic:
    """T̃ from the frozen forward network over noisy memory banks (no gradient anywhere)."""
    vocab, k = run.vocab, run.cfg.lns.k
    batch = fw.batch(indices, vocab)
    model: Seq2Seq = fw.engine.module
    with torch.no_grad(), frozen(fw.engine):
        enc = model.encode(batch.src, batch.src_lengths)
        enc_k, _ = noisy_memory(model, enc, _noise_mu(run, enc.memory), k, run.cfg.lns.lam, run.stream)
        synthetic = argmax_targets(model, enc_k, batch.tgt_in, batch.tgt_out, vocab.pad_id, vocab.bos_id,
                                   vocab.eos_id)
    return synthetic


def _rewards(run: Run, bw: Network, synthetic: Synthetic, indices: list[int]) -> torch.Tensor:
    bw_batch = bw.batch(indices, run.vocab)  # its decoder side is the real source S
    with frozen(bw.engine):
        return rewards(bw.engine.module, synthetic, bw_batch.tgt_in, bw_batch.tgt_out, run.cfg.lns.k,
                       run.vocab.pad_id, run.vocab.eos_id)


def noise_step(run: Run, indices: list[int], meter: Meter) -> None:
    """Train ψ: score-function term (R − b)·log p(δ) through lns_score_grad, plus the strength term."""
    cfg, vocab, k, lam = run.cfg, run.vocab, run.cfg.lns.k, run.cfg.lns.lam
    fw, bw = run.network("forward"), run.network("backward")
    model: Seq2Seq = fw.engine.module
    batch = fw.batch(indices, vocab)
    with frozen(fw.engine):
        with torch.no_grad():
            enc = model.encode(batch.src, batch.src_lengths)
        mu = run.noise(enc.memory.detach())  # the one trained network here: gradient reaches ψ through μ
        offset = run.stream.offset
        enc_k, strength = noisy_memory(model, enc, mu, k, lam, run.stream)
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
    run.guard.update(run.noise, loss, "noise")
    with torch.no_grad():
        real = enc.mask.unsqueeze(0).expand_as(strength)
        meter.add("noise/strength", float(strength[real].sum()), float(real.sum()))
        meter.add("noise/reward", float(reward.sum()), reward.numel())
        if lam > 0:
            meter.add("noise/score_loss", float(-(adv * _log_density(enc, enc_k, mu, k, lam)).sum()), adv.numel())


def _log_density(enc: EncoderOutput, enc_k: EncoderOutput, mu: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """log N(δ_k; μ, softplus(μ)) per sentence (K, B), with ε recovered from h̃ = h + λ(μ + σε)."""
    with torch.no_grad():
        sigma = torch.nn.functional.softplus(mu)
        h_noisy = enc_k.memory.view(k, *enc.memory.shape)
        eps = ((h_noisy - enc.memory) / lam - mu) / sigma
        per_element = -torch.log(sigma) - 0.5 * eps.square() - HALF_LOG_2PI
        return (per_element.sum(dim=-1) * enc.mask).sum(dim=-1)


def forward_step(run: Run, indices: list[int], adversarial: bool, meter: Meter) -> None:
    """MLE on real pairs; with ``adversarial``, also REINFORCE on T̃ with the backward network as critic."""
    cfg, vocab, k = run.cfg, run.vocab, run.cfg.lns.k
    fw, bw = run.network("forward"), run.network("backward")
    batch = fw.batch(indices, vocab)
    loss, ntok = mle_step(fw.engine, batch, vocab.pad_id, cfg.train.label_smoothing, _update(run, "forward MLE"))
    meter.add("fw/mle_nll", float(loss), ntok)
    if not adversarial:
        return
    made: dict[str, Any] = {}

    def perturb(model: Seq2Seq, enc: EncoderOutput) -> EncoderOutput:
        enc_k, _ = noisy_memory(model, enc, _noise_mu(run, enc.memory), k, cfg.lns.lam, run.stream)
        return enc_k

    def targets(model: Seq2Seq, enc_k: EncoderOutput) -> torch.Tensor:
        made["synthetic"] = argmax_targets(model, enc_k, batch.tgt_in, batch.tgt_out, vocab.pad_id,
                                           vocab.bos_id, vocab.eos_id)
        tgt_in, made["tgt_out"] = made["synthetic"].decoder_io(vocab.bos_id, vocab.eos_id, vocab.pad_id)
        return tgt_in

    # One engine forward: encode, perturb K times, pick T̃, score T̃ (same dropout masks throughout).
    logits = fw.engine(batch.src, batch.src_lengths, perturb=perturb, targets=targets)
    nll = sentence_nll(logits, made["tgt_out"], vocab.pad_id).view(k, len(indices))
    reward = _rewards(run, bw, made["synthetic"], indices)
    adv_loss = forward_adversarial_loss(nll, advantages(reward, cfg.ami.baseline))
    with gradient_clipping(fw.engine, cfg.ami.fw_adv_clip):
        run.guard.update(fw.engine, adv_loss, "forward adversarial")
    meter.add("fw/adv_loss", float(adv_loss.detach()))
    meter.add("fw/reward", float(reward.sum()), reward.numel())


def backward_step(run: Run, indices: list[int], adversarial: bool, meter: Meter) -> None:
    """MLE on real pairs; with ``adversarial``, also demote synthetic pairs (S, T̃) by their own w_k."""
    cfg, vocab, k = run.cfg, run.vocab, run.cfg.lns.k
    fw, bw = run.network("forward"), run.network("backward")
    real = bw.batch(indices, vocab)  # T -> S
    loss, ntok = mle_step(bw.engine, real, vocab.pad_id, cfg.train.label_smoothing, _update(run, "backward MLE"))
    meter.add("bw/mle_nll", float(loss), ntok)
    if not adversarial:
        return
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
    adv_loss = backward_adversarial_loss(real_nll, syn_nll, weights)
    with gradient_clipping(bw.engine, cfg.ami.bw_adv_clip):
        run.guard.update(bw.engine, adv_loss, "backward adversarial")
    meter.add("bw/real_logq", float(-real_nll.detach().sum()), len(indices))
    meter.add("bw/synth_logq", float(-syn_nll.detach().sum()), syn_nll.numel())
    meter.add("bw/demote_weight", float(weights.sum()), weights.numel())


def make_stream(seed: int, rank: int) -> NoiseStream:
    """The rank's latent-noise stream: the rank is folded into the 64-bit seed."""
    return NoiseStream((seed * 1_000_003 + rank) % (1 << 64))
