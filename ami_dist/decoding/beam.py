"""Batched beam search with a length penalty and a maximum output length relative to the source.

All sentences of a batch and all their hypotheses advance together as one (B·beam) decoder batch; the
decoder state is reordered by row selection. Like greedy decoding it can keep stepping until every rank
is done (``all_done``), which ZeRO-3 needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ami_dist.models.seq2seq import Seq2Seq


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    logprob: float  # log p(tokens, EOS | source), summed over positions
    score: float  # logprob divided by the length penalty: what the search ranks by


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's length penalty ((5 + |T|) / 6)^α (Wu et al., 2016); α = 0 ranks by plain log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def _local(done: bool) -> bool:
    return done


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lengths: torch.Tensor, *, beam_size: int, bos_id: int,
                eos_id: int, pad_id: int, max_len_a: float, max_len_b: int, alpha: float = 0.0, n_best: int = 1,
                all_done: Callable[[bool], bool] = _local) -> list[list[Hypothesis]]:
    """The ``n_best`` highest-scoring hypotheses of every source sentence, best first.

    A sentence's search ends when it holds ``beam_size`` finished hypotheses or reaches its maximum
    length ``max_len_a · |S| + max_len_b`` (unfinished hypotheses are then finished as they stand). A sentence
    whose search has ended leaves the decoder batch, so the others step on without it.
    """
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, got {beam_size} and {n_best}")
    batch, device = src.size(0), src.device
    enc = model.encode(src, src_lengths)
    enc = enc.select(torch.arange(batch, device=device).repeat_interleave(beam_size))
    max_len = (max_len_a * src_lengths.float() + max_len_b).long().tolist()
    # Only the first hypothesis of each sentence is alive at the start (the others would be duplicates).
    scores = torch.full((batch, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0
    history = torch.full((batch * beam_size, 0), pad_id, dtype=torch.long, device=device)
    last = torch.full((batch * beam_size, 1), bos_id, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    active = list(range(batch))  # the sentences still searched, in the order of the decoder batch's rows
    state = None
    step = 0
    while not all_done(not active):
        out, state = model.decode(last, enc, state)
        logp = torch.log_softmax(model.generator(out[:, -1]).float(), dim=-1)
        logp[:, pad_id] = float("-inf")
        logp[:, bos_id] = float("-inf")
        rows, vocab = scores.size(0), logp.size(-1)
        candidates = (scores.unsqueeze(-1) + logp.view(rows, beam_size, vocab)).view(rows, -1)
        top_scores, top_index = candidates.topk(2 * beam_size, dim=1)
        top_tokens, top_origin = top_index % vocab, top_index // vocab
        step += 1
        # The best beam_size continuations that are not EOS stay alive (at most beam_size of the
        # 2·beam_size candidates end in EOS, one per hypothesis, so enough remain).
        alive_scores = top_scores.masked_fill(top_tokens == eos_id, float("-inf"))
        scores, pick = alive_scores.topk(beam_size, dim=1)
        origin = (top_origin.gather(1, pick) + torch.arange(rows, device=device).unsqueeze(1) * beam_size).view(-1)
        tokens = top_tokens.gather(1, pick).view(-1, 1)
        old_history = history
        history = torch.cat([history.index_select(0, origin), tokens], dim=1)
        if not active:  # nothing left here: stepping only for other ranks
            scores = torch.full_like(scores, float("-inf"))
            last = tokens
            state = state.select(origin)
            continue
        # One transfer of the step's candidates, then plain Python: only an EOS among the best beam_size
        # candidates finishes a hypothesis (as in fairseq), so a beam of 1 is exactly greedy decoding.
        eos_at = (top_tokens[:, :beam_size] == eos_id) & (top_scores[:, :beam_size] > float("-inf"))
        keep = []
        for row, (b, ends) in enumerate(zip(active, eos_at.tolist(), strict=True)):
            for j in (j for j, end in enumerate(ends) if end):
                tokens_j = old_history[row * beam_size + int(top_origin[row, j])].tolist()
                logprob = float(top_scores[row, j])
                finished[b].append(Hypothesis(tokens_j, logprob, logprob / length_penalty(len(tokens_j) + 1, alpha)))
            if step >= max_len[b]:  # out of length: what is alive is finished as it stands
                alive = scores[row].tolist()
                for j in (j for j, score in enumerate(alive) if score > float("-inf")):
                    tokens_j = history[row * beam_size + j].tolist()
                    finished[b].append(Hypothesis(tokens_j, alive[j], alive[j] / length_penalty(len(tokens_j), alpha)))
            elif len(finished[b]) < beam_size:
                keep.append(row)
        state = state.select(origin)
        last = tokens
        if len(keep) < rows and keep:  # finished sentences leave the batch
            kept = torch.tensor(keep, device=device)
            beam_rows = (kept.unsqueeze(1) * beam_size + torch.arange(beam_size, device=device)).view(-1)
            scores, history, last = scores[kept], history[beam_rows], last[beam_rows]
            state, enc = state.select(beam_rows), enc.select(beam_rows)
        elif not keep:  # all done here; other ranks may still step (all_done), on the rows as they are
            scores = torch.full_like(scores, float("-inf"))
        active = [active[row] for row in keep]
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]
