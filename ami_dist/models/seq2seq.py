"""What every seq2seq family provides; the forward p(T|S) and backward q(S|T) networks are two instances.

A family (LSTM, Transformer) implements ``encode``, ``decode`` (teacher-forced or incremental) and
``perturbed`` (the K noisy memory banks of latent noise sampling as one K·B batch). Decoding, the AMI
phases and evaluation use only this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn


class DecoderState(Protocol):
    """Whatever a family carries from one decoding step to the next."""

    def select(self, index: torch.Tensor) -> DecoderState:
        """The state of rows ``index`` (beam search reorders and prunes hypotheses with it)."""
        ...


def _select(value: Any, index: torch.Tensor, dim: int) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_select(v, index, dim) for v in value)
    return value.index_select(dim, index)


@dataclass
class EncoderOutput:
    memory: torch.Tensor  # (B, S, H) the memory bank the decoder attends to
    mask: torch.Tensor  # (B, S) True at real source tokens
    keys: torch.Tensor | None = None  # (B, S, H) memory projected for attention scores (LSTM)
    state: Any = None  # the decoder's initial recurrent state, (h, c) each (layers, B, H) (LSTM)

    def select(self, index: torch.Tensor) -> EncoderOutput:
        """Rows ``index`` of the batch (beam search tiles each source once per hypothesis with it)."""
        return EncoderOutput(self.memory.index_select(0, index), self.mask.index_select(0, index),
                             _select(self.keys, index, 0), _select(self.state, index, 1))


class Seq2Seq(nn.Module):
    """Base of the seq2seq families: embeddings, encoder, decoder, generator."""

    src_emb: nn.Embedding
    tgt_emb: nn.Embedding
    generator: nn.Linear
    pad_id: int

    def init_plan(self) -> list[tuple[str, Callable[[torch.Tensor], None]]]:
        """The initialisation as steps, each on one parameter (by its name, ``get_parameter``'s), in the order
        they draw from the random number generator. One parameter at a time: under ZeRO-3 each is gathered
        whole for its step only (distributed.engines.construct_model), and the weights are the same."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        for name, init in self.init_plan():
            init(self.get_parameter(name))

    def zero_padding_row(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight[self.pad_id].zero_()

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderOutput:
        raise NotImplementedError

    def decode(self, tgt_in: torch.Tensor, enc: EncoderOutput,
               state: DecoderState | None = None) -> tuple[torch.Tensor, DecoderState]:
        """Decoder outputs (B, T, H) for ``tgt_in`` (B, T), continuing from ``state`` if given."""
        raise NotImplementedError

    def memory_keys(self, memory: torch.Tensor) -> torch.Tensor | None:
        """Whatever the family precomputes from the memory bank for attention (None: nothing)."""
        return None

    def perturbed(self, enc: EncoderOutput, memory: torch.Tensor) -> EncoderOutput:
        """``enc`` with its memory bank replaced by K perturbed copies (K, B, S, H), as one batch of K·B.

        Rows k·B .. k·B + B − 1 hold copy k (the layout of ``lns_sample``'s h_noisy flattened), so the
        decoder runs all K samples in one call. Anything derived from the memory is recomputed from the
        noisy copies; the mask and the initial state are tiled (latent noise sampling perturbs the memory).
        """
        k, batch = memory.shape[:2]
        flat = memory.reshape(k * batch, *memory.shape[2:])
        tile = torch.arange(batch, device=memory.device).repeat(k)
        return replace(enc.select(tile), memory=flat, keys=self.memory_keys(flat))

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor, *,
                perturb: Callable[[Seq2Seq, EncoderOutput], EncoderOutput] | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (N, T, vocab) of the next token at every target position.

        With ``positions`` (a boolean (N, T) mask, e.g. the non-pad targets), only those positions go
        through the generator: logits (P, vocab) in row-major order, and no work on padding.

        ``perturb`` replaces the encoder output inside the one forward call (so a DeepSpeed engine sees a
        single forward), e.g. by K noisy copies, with ``tgt_in`` then of N = K·B rows.
        """
        enc = self.encode(src, src_lengths)
        if perturb is not None:
            enc = perturb(self, enc)
        out, _ = self.decode(tgt_in, enc)
        return self.generator(out if positions is None else out[positions])


def source_mask(src: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
    """(B, S) True at the first ``src_lengths`` positions of each row."""
    return torch.arange(src.size(1), device=src.device).unsqueeze(0) < src_lengths.unsqueeze(1)


def target_lengths(tgt_in: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) each row's length up to and including its last non-pad token (what teacher forcing computes)."""
    steps = torch.arange(1, tgt_in.size(1) + 1, device=tgt_in.device)
    return ((tgt_in != pad_id) * steps).amax(dim=1)
