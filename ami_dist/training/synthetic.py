"""Synthetic targets by latent noise sampling, and the backward network's rewards for them.

The forward network decodes teacher-forced on the gold prefix over K noisy memory banks (one batch of
K·B); T̃_k is the argmax at every gold position, cut at the first EOS. The same teacher-forced logits
score T̃ for the forward network's REINFORCE term (as the official release does), so T̃ is reinforced
under the distribution it was chosen from. Everything is tensor-wide: no Python loop over sentences or
samples. Row k·B + b of every (K·B, ...) tensor is sample k of sentence b.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ami_dist import ops
from ami_dist.models.seq2seq import EncoderOutput, Seq2Seq
from ami_dist.training.losses import positions_nll


@dataclass
class NoiseStream:
    """Where the next latent-noise draw starts; the seed folds in the rank so ranks draw different noise."""

    seed: int
    offset: int = 0

    def take(self, k: int, numel: int) -> int:
        """The offset for a call drawing k·numel normals; advances past them."""
        start = self.offset
        self.offset = ops.next_offset(self.offset, k, numel)
        return start


@dataclass
class Synthetic:
    tokens: torch.Tensor  # (K·B, T) T̃ without EOS, right-padded
    lengths: torch.Tensor  # (K·B,) tokens in each T̃ (0 when the first prediction was EOS)

    def as_source(self, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T̃ as the backward network's source (K·B, T); an empty T̃ is read as the single token EOS."""
        tokens = self.tokens.clone()
        empty = self.lengths == 0
        tokens[empty, 0] = eos_id
        return tokens, self.lengths.clamp(min=1)

    def distinct_per_sentence(self, k: int) -> torch.Tensor:
        """(B,) how many of the K samples of each sentence differ from each other (1: all K equal)."""
        tokens = self.tokens.view(k, -1, self.tokens.size(1))
        lengths = self.lengths.view(k, -1)
        same = (tokens[:, None] == tokens[None, :]).all(dim=-1) & (lengths[:, None] == lengths[None, :])
        earlier = torch.ones(k, k, dtype=torch.bool, device=same.device).tril(-1)  # [j, i]: i < j
        seen_before = (same & earlier[:, :, None]).any(dim=1)  # (K, B): sample j repeats an earlier one
        return (~seen_before).sum(dim=0)


@dataclass
class Picks:
    """T̃ chosen from teacher-forced logits at the gold positions, and what those logits score."""

    synthetic: Synthetic
    targets: torch.Tensor  # (P,) per gold position: the token scored there, pad_id past the first EOS
    inside: torch.Tensor  # (K·B, T) the gold positions, True where the logits' P rows come from

    def nll(self, logits: torch.Tensor, pad_id: int) -> torch.Tensor:
        """(K·B,) length-normalised NLL of T̃ (and its EOS, where it was chosen) under ``logits`` (P, vocab)."""
        return positions_nll(logits, self.targets, self.inside, pad_id)


def pick(logits: torch.Tensor, inside: torch.Tensor, pad_id: int, bos_id: int, eos_id: int) -> Picks:
    """T̃ from teacher-forced logits (P, vocab) of the P gold positions ``inside`` (K·B, T), row-major.

    The argmax at every gold position, never padding or BOS, cut at the first EOS (and at the end of the
    gold target). The scored targets are T̃'s tokens and the first EOS where it falls inside the gold
    length, as in the release (which scores T̃ + EOS, cut to the gold length).
    """
    top = logits.detach().topk(min(3, logits.size(-1)), dim=-1).indices  # the best that is not PAD or BOS
    usable = (top != pad_id) & (top != bos_id)
    choice = top.gather(1, usable.to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1)
    pred = torch.full(inside.shape, pad_id, dtype=choice.dtype, device=choice.device).masked_scatter(inside, choice)
    eos = (pred == eos_id) & inside
    eos_before = eos.cumsum(dim=1)
    keep = inside & (eos_before == 0)  # a prefix of every row
    scored = inside & (eos_before - eos.long() == 0)  # that prefix and the first EOS
    return Picks(Synthetic(pred.masked_fill(~keep, pad_id), keep.sum(dim=1)),
                 pred.masked_fill(~scored, pad_id)[inside], inside)


def noisy_memory(model: Seq2Seq, enc: EncoderOutput, mu: torch.Tensor, k: int, scale: float,
                 stream: NoiseStream) -> tuple[EncoderOutput, torch.Tensor, int]:
    """K perturbed copies h + s·δ_k of the encoder memory as one K·B decoder batch, the strengths (K, B, S)
    and the stream offset the draws started at (for ``lns_score_grad`` of the same draws).

    Gradients flow to the memory (hence the encoder) and to μ where the caller lets them.
    """
    memory = enc.memory.contiguous()
    offset = stream.take(k, mu.numel())
    h_noisy, strength = ops.lns_sample(memory, mu.contiguous(), k, scale, stream.seed, offset, mask=enc.mask)
    return model.perturbed(enc, h_noisy), strength, offset


def gold_positions(gold_out: torch.Tensor, k: int, pad_id: int) -> torch.Tensor:
    """(K·B, T) True at the real positions of the gold targets, tiled K times (sample-major)."""
    return (gold_out != pad_id).repeat(k, 1)


@torch.no_grad()
def argmax_targets(model: Seq2Seq, enc: EncoderOutput, gold_in: torch.Tensor, gold_out: torch.Tensor,
                   pad_id: int, bos_id: int, eos_id: int) -> Synthetic:
    """T̃ by a teacher-forced pass (no gradient) over the K·B noisy encoder output ``enc``.

    ``gold_in``/``gold_out`` (B, T) are tiled to match; see :func:`pick`.
    """
    k = enc.memory.size(0) // gold_in.size(0)
    inside = gold_positions(gold_out, k, pad_id)
    out, _ = model.decode(gold_in.repeat(k, 1), enc)
    return pick(model.generator(out[inside]), inside, pad_id, bos_id, eos_id).synthetic


@torch.no_grad()
def rewards(backward: Callable[..., torch.Tensor], synthetic: Synthetic, src_in: torch.Tensor,
            src_out: torch.Tensor, k: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """R_k = length-normalised log q_φ(S | T̃_k), (K, B), from the backward network (no gradient).

    ``src_in``/``src_out`` are the backward network's decoder input/output for the real sources (B, L).
    """
    tokens, lengths = synthetic.as_source(eos_id)
    target = src_out.repeat(k, 1)
    real = target != pad_id  # the generator runs on S's real positions only, not on the padding
    logits = backward(tokens, lengths, src_in.repeat(k, 1), positions=real)
    return -positions_nll(logits, target[real], real, pad_id).view(k, -1)
