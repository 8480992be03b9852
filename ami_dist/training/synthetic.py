"""Synthetic targets by latent noise sampling, and the backward network's rewards for them.

The forward network decodes teacher-forced over K noisy memory banks (one batch of K·B); T̃_k is the
argmax at every position, cut at the first EOS. Everything is tensor-wide: no Python loop over
sentences or samples. Row k·B + b of every (K·B, ...) tensor is sample k of sentence b.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ami_dist import ops
from ami_dist.models.seq2seq import EncoderOutput, Seq2Seq
from ami_dist.training.losses import sentence_nll


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

    def decoder_io(self, bos_id: int, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing input [BOS] + T̃ and gold output T̃ + [EOS], (K·B, T + 1) each."""
        n = self.tokens.size(0)
        tgt_in = torch.cat([self.tokens.new_full((n, 1), bos_id), self.tokens], dim=1)
        tgt_out = torch.cat([self.tokens, self.tokens.new_full((n, 1), pad_id)], dim=1)
        tgt_out[torch.arange(n), self.lengths] = eos_id
        return tgt_in, tgt_out

    def as_source(self, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T̃ as the backward network's source (K·B, T); an empty T̃ is read as the single token EOS."""
        tokens = self.tokens.clone()
        empty = self.lengths == 0
        tokens[empty, 0] = eos_id
        return tokens, self.lengths.clamp(min=1)


def noisy_memory(model: Seq2Seq, enc: EncoderOutput, mu: torch.Tensor, k: int, lam: float,
                 stream: NoiseStream) -> tuple[EncoderOutput, torch.Tensor]:
    """K perturbed copies of the encoder memory as one K·B decoder batch, and the strengths (K, B, S).

    Gradients flow to the memory (hence the encoder) and to μ where the caller lets them.
    """
    memory = enc.memory.contiguous()
    offset = stream.take(k, mu.numel())
    h_noisy, strength = ops.lns_sample(memory, mu.contiguous(), k, lam, stream.seed, offset, mask=enc.mask)
    return model.perturbed(enc, h_noisy), strength


@torch.no_grad()
def argmax_targets(model: Seq2Seq, enc: EncoderOutput, gold_in: torch.Tensor, gold_out: torch.Tensor,
                   pad_id: int, bos_id: int, eos_id: int) -> Synthetic:
    """T̃: the argmax token at every gold position, decoding teacher-forced on the gold prefix.

    ``enc`` is the K·B noisy encoder output; ``gold_in``/``gold_out`` (B, T) are tiled to match.
    Cut at the first EOS (and at the end of the gold target); padding and BOS are never predicted.
    """
    k = enc.memory.size(0) // gold_in.size(0)
    out, _ = model.decode(gold_in.repeat(k, 1), enc)
    logits = model.generator(out)
    logits[..., pad_id] = float("-inf")
    logits[..., bos_id] = float("-inf")
    pred = logits.argmax(dim=-1)
    inside = gold_out.repeat(k, 1) != pad_id
    before_eos = (pred == eos_id).cumsum(dim=1) == 0
    keep = inside & before_eos  # a prefix of every row
    return Synthetic(pred.masked_fill(~keep, pad_id), keep.sum(dim=1))


@torch.no_grad()
def rewards(backward: Callable[..., torch.Tensor], synthetic: Synthetic, src_in: torch.Tensor,
            src_out: torch.Tensor, k: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """R_k = length-normalised log q_φ(S | T̃_k), (K, B), from the backward network (no gradient).

    ``src_in``/``src_out`` are the backward network's decoder input/output for the real sources (B, L).
    """
    tokens, lengths = synthetic.as_source(eos_id)
    logits = backward(tokens, lengths, src_in.repeat(k, 1))
    nll = sentence_nll(logits, src_out.repeat(k, 1), pad_id, length_normalise=True)
    return -nll.view(k, -1)
