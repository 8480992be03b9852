"""Reranking the forward network's n-best lists with the backward network.

``mmi``: log p(T|S) + α·log q(S|T) + γ·|T|, MMI-bidi reranking (Li et al., 2016, "A Diversity-Promoting
Objective Function for Neural Conversation Models"); ``backward``: log q(S|T) alone, as the official AMI
release reranks dialog responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ami_dist.data.batching import make_batch
from ami_dist.decoding.beam import Hypothesis
from ami_dist.models.seq2seq import Seq2Seq
from ami_dist.training.losses import positions_nll


@dataclass(frozen=True)
class Reranker:
    method: str  # "mmi" or "backward"
    alpha: float = 0.5  # weight of log q(S|T) in mmi
    gamma: float = 0.0  # length bonus per target token in mmi

    def score(self, hyp: Hypothesis, backward_logq: float) -> float:
        if self.method == "backward":
            return backward_logq
        if self.method == "mmi":
            return hyp.logprob + self.alpha * backward_logq + self.gamma * len(hyp.tokens)
        raise ValueError(f"unknown reranking method {self.method!r} (expected 'mmi' or 'backward')")

    def rerank(self, nbest: list[Hypothesis], backward_logq: Sequence[float]) -> list[Hypothesis]:
        """The n-best list ordered by this reranker's score (best first); ``score`` is replaced by it."""
        scored = [replace(h, score=self.score(h, q)) for h, q in zip(nbest, backward_logq, strict=True)]
        return sorted(scored, key=lambda h: h.score, reverse=True)


@torch.no_grad()
def target_logprob(network: torch.nn.Module, inputs: Sequence[list[int]], targets: Sequence[list[int]], *,
                   pad_id: int, bos_id: int, eos_id: int, length_normalise: bool = False,
                   device: torch.device | str = "cpu") -> list[float]:
    """log P(target, EOS | input) of each pair under ``network``, teacher-forced, as one batch.

    An empty input is read as the single token EOS (as in training); ``length_normalise`` divides by the
    number of target tokens (EOS included).
    """
    if not inputs:
        return []
    batch = make_batch([s or [eos_id] for s in inputs], list(targets), pad_id, bos_id, eos_id).to(device)
    scored = batch.tgt_out != pad_id  # only these positions go through the generator: none of the padding
    logits = network(batch.src, batch.src_lengths, batch.tgt_in, positions=scored)
    nll = positions_nll(logits, batch.tgt_out[scored], scored, pad_id, length_normalise=length_normalise)
    return (-nll).tolist()


def source_logq(backward: torch.nn.Module, outputs: Sequence[list[int]], sources: Sequence[list[int]], *, pad_id: int,
                bos_id: int, eos_id: int, length_normalise: bool = False,
                device: torch.device | str = "cpu") -> list[float]:
    """log q(S | T) of each source S given the output T beside it, under a backward network, as one batch:
    :func:`target_logprob` with the output as input. With ``length_normalise``, the form of AMI's rewards and
    of ``valid/mi_logq``."""
    return target_logprob(backward, outputs, sources, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id,
                          length_normalise=length_normalise, device=device)


def rerank_all(reranker: Reranker, backward: Seq2Seq, sources: Sequence[list[int]], nbests: Sequence[list[Hypothesis]],
               *, pad_id: int, bos_id: int, eos_id: int, device: torch.device | str = "cpu") -> list[list[Hypothesis]]:
    """Every n-best list reranked, with log q(S | T) of all their hypotheses computed as one batch."""
    outputs = [h.tokens for hyps in nbests for h in hyps]
    repeated = [source for source, hyps in zip(sources, nbests, strict=True) for _ in hyps]
    logq = source_logq(backward, outputs, repeated, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, device=device)
    ranked, start = [], 0
    for hyps in nbests:
        ranked.append(reranker.rerank(hyps, logq[start : start + len(hyps)]))
        start += len(hyps)
    return ranked
