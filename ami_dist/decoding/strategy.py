"""How outputs are found for a list of sources: greedy, beam search (an n-best list) or sampling, each
optionally reranked with the other network; batched by length for speed, returned in input order.

``ami-evaluate`` and ``ami-generate`` both decode through :func:`decode_all`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ami_dist.data.batching import make_batch
from ami_dist.data.vocab import Vocab
from ami_dist.decoding.beam import Hypothesis, beam_search
from ami_dist.decoding.greedy import greedy_decode
from ami_dist.decoding.rerank import Reranker, rerank_all, target_logprob
from ami_dist.decoding.sampling import sample
from ami_dist.models.seq2seq import Seq2Seq


@dataclass(frozen=True)
class Strategy:
    method: Literal["greedy", "beam", "sample"] = "greedy"
    beam: int = 5  # beam: the beam size
    pool: int = 1  # beam: hypotheses kept per source (the n-best list, what reranking reorders)
    length_penalty: float = 0.0  # beam: GNMT's α
    num_samples: int = 1  # sample: outputs drawn per source
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: the whole distribution
    seed: int = 0
    max_len_a: float = 1.5  # an output ends after max_len_a · |S| + max_len_b tokens
    max_len_b: int = 10
    rerank: Reranker | None = None
    scored: bool = True  # greedy: also compute log p(T|S) (one teacher-forced pass); otherwise it is NaN

    def __post_init__(self) -> None:
        if self.method == "beam" and not 1 <= self.pool <= self.beam:
            raise ValueError(f"need 1 <= pool <= beam, got pool {self.pool} and beam {self.beam}")
        if self.rerank is not None and self.candidates() < 2:
            raise ValueError("reranking needs at least two candidates per source (a beam n-best list or samples)")

    def candidates(self) -> int:
        """How many hypotheses each source gets."""
        return {"greedy": 1, "beam": self.pool, "sample": self.num_samples}[self.method]


@torch.no_grad()
def decode_batch(strategy: Strategy, model: Seq2Seq, other: Seq2Seq | None, sources: Sequence[list[int]],
                 indices: Sequence[int], ids: Vocab) -> list[list[Hypothesis]]:
    """The hypotheses of each source of one batch, best first (by ``score``: the search's, or the reranker's).

    ``other`` is the network of the opposite direction (it reranks); ``indices`` are the sources' positions in
    the whole input (sampling seeds its streams with them).
    """
    pad, bos, eos = ids.pad_id, ids.bos_id, ids.eos_id
    batch = make_batch(list(sources), [[]] * len(sources), pad, bos, eos)
    limits = dict(max_len_a=strategy.max_len_a, max_len_b=strategy.max_len_b)
    if strategy.method == "greedy":
        max_len = int(strategy.max_len_a * int(batch.src_lengths.max()) + strategy.max_len_b)
        outputs = greedy_decode(model, batch.src, batch.src_lengths, bos_id=bos, eos_id=eos, pad_id=pad,
                                max_len=max_len)
        logp = (target_logprob(model, sources, outputs, pad_id=pad, bos_id=bos, eos_id=eos)
                if strategy.scored else [math.nan] * len(outputs))
        return [[Hypothesis(t, lp, lp)] for t, lp in zip(outputs, logp, strict=True)]
    if strategy.method == "beam":
        found = beam_search(model, batch.src, batch.src_lengths, beam_size=strategy.beam, n_best=strategy.pool,
                            bos_id=bos, eos_id=eos, pad_id=pad, alpha=strategy.length_penalty, **limits)
    else:
        found = sample(model, batch.src, batch.src_lengths, indices=indices, seed=strategy.seed,
                       num_samples=strategy.num_samples, bos_id=bos, eos_id=eos, pad_id=pad,
                       temperature=strategy.temperature, top_k=strategy.top_k, top_p=strategy.top_p, **limits)
        found = [sorted(hyps, key=lambda h: h.score, reverse=True) for hyps in found]
    if strategy.rerank is not None:
        if other is None:
            raise ValueError("reranking needs the network of the other direction")
        found = rerank_all(strategy.rerank, other, sources, found, pad_id=pad, bos_id=bos, eos_id=eos)
    return found


def decode_all(strategy: Strategy, model: Seq2Seq, other: Seq2Seq | None, sources: Sequence[list[int]],
               ids: Vocab, batch_size: int, first_index: int = 0) -> list[list[Hypothesis]]:
    """:func:`decode_batch` over ``sources`` in batches of similar length; results in input order. Source ``i``
    is input position ``first_index + i``. An empty source gets one empty hypothesis per candidate, undecoded."""
    order = sorted((i for i in range(len(sources)) if sources[i]), key=lambda i: len(sources[i]))
    found: dict[int, list[Hypothesis]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        hyps = decode_batch(strategy, model, other, [sources[i] for i in rows], [first_index + i for i in rows], ids)
        found.update(zip(rows, hyps, strict=True))
    empty = [Hypothesis([], math.nan, math.nan)] * strategy.candidates()
    return [found.get(i, empty) for i in range(len(sources))]
