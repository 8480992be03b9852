"""A 'network' whose next-token distribution is a fixed table keyed by the prefix decoded so far: decoding
tests whose right answers are worked out by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ami_dist.models.seq2seq import EncoderOutput, Seq2Seq

PAD, UNK, BOS, EOS, A, B = 0, 1, 2, 3, 4, 5
V = 6


@dataclass
class History:
    tokens: torch.Tensor

    def select(self, index: torch.Tensor) -> History:
        return History(self.tokens.index_select(0, index))


class TableModel(Seq2Seq):
    """A 'network' whose next-token distribution is a fixed table keyed by the prefix decoded so far."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]]) -> None:
        super().__init__()
        self.contexts = {prefix: i for i, prefix in enumerate(table)}
        weight = torch.full((V, len(table) + 1), -1e4)
        weight[EOS, len(table)] = 0.0  # any prefix not in the table ends
        for prefix, dist in table.items():
            for token, p in dist.items():
                weight[token, self.contexts[prefix]] = math.log(p)
        self.generator = nn.Linear(len(table) + 1, V, bias=False)
        self.generator.weight.data = weight

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(torch.zeros(src.size(0), 1, 1), torch.ones(src.size(0), 1, dtype=torch.bool))

    def decode(self, tgt_in: torch.Tensor, enc: EncoderOutput, state: History | None = None):
        history = tgt_in if state is None else torch.cat([state.tokens, tgt_in], dim=1)
        out = torch.zeros(tgt_in.size(0), tgt_in.size(1), len(self.contexts) + 1)
        start = history.size(1) - tgt_in.size(1)
        for b in range(tgt_in.size(0)):
            for t in range(tgt_in.size(1)):
                prefix = tuple(history[b, 1 : start + t + 1].tolist())  # the tokens after BOS
                out[b, t, self.contexts.get(prefix, len(self.contexts))] = 1.0
        return out, History(history)
