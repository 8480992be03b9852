"""Sampling: temperature, top-k and nucleus (top-p, Holtzman et al., 2020), several samples per source.

Every sample draws from its own random stream, seeded from (seed, the source's index in the input, the
sample's number), so a sample does not depend on what else shares its batch, on the batch size or on how
many other samples are asked for: the same seed gives the same samples however the input is batched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ami_dist.decoding.beam import Hypothesis
from ami_dist.models.seq2seq import Seq2Seq


def sample_seed(seed: int, index: int, number: int) -> int:
    """The seed of sample ``number`` of the source at position ``index`` of the input."""
    digest = hashlib.blake2b(f"{seed}:{index}:{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """(N, V) logits divided by the temperature, with −inf outside the ``top_k`` most likely tokens (0: no
    limit) and outside the nucleus: the fewest most likely tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
        outside = before >= top_p  # in sorted order; back to vocabulary order:
        drop = torch.zeros_like(outside).scatter(-1, order, outside)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of (N, V) probabilities, row n by inverting its CDF at a uniform from stream n."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return pick.clamp(max=probs.size(-1) - 1)


@torch.no_grad()
def sample(model: Seq2Seq, src: torch.Tensor, src_lengths: torch.Tensor, *, indices: Sequence[int], seed: int,
           num_samples: int, bos_id: int, eos_id: int, pad_id: int, max_len_a: float, max_len_b: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[list[Hypothesis]]:
    """``num_samples`` outputs of every source, in the order drawn; ``indices`` are the sources' positions in
    the input (they seed the streams). A sample ends at EOS or at ``max_len_a · |S| + max_len_b`` tokens.

    ``logprob`` (and ``score``) is log p(T, EOS | S) under the model itself (temperature 1, nothing filtered;
    padding and BOS excluded, as in beam search), whatever distribution the tokens were drawn from.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    batch, device = src.size(0), src.device
    if len(indices) != batch:
        raise ValueError(f"{batch} sources but {len(indices)} indices")
    generators = [torch.Generator().manual_seed(sample_seed(seed, i, j)) for i in indices for j in range(num_samples)]
    rows = torch.arange(batch, device=device).repeat_interleave(num_samples)
    enc = model.encode(src, src_lengths).select(rows)
    max_len = (max_len_a * src_lengths.float() + max_len_b).long().index_select(0, rows)
    prev = torch.full((len(rows), 1), bos_id, dtype=torch.long, device=device)
    logprob = torch.zeros(len(rows), dtype=torch.float64, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    state = None
    while not bool(finished.all()):
        out, state = model.decode(prev, enc, state)
        logp = torch.log_softmax(model.generator(out[:, -1]).float(), dim=-1)
        logp[:, pad_id] = float("-inf")
        logp[:, bos_id] = float("-inf")
        probs = torch.softmax(filter_logits(logp, temperature=temperature, top_k=top_k, top_p=top_p), dim=-1)
        token = _draw(probs, generators)
        live = ~finished
        logprob += torch.where(live, logp.gather(1, token.unsqueeze(1)).squeeze(1).double(), 0.0)
        token = token.masked_fill(finished, pad_id)
        steps.append(token)
        finished |= token == eos_id
        finished |= len(steps) >= max_len  # out of length: finished as it stands
        prev = token.unsqueeze(1)
    ids = torch.stack(steps, dim=1).tolist()
    out_rows = []
    for row, value in zip(ids, logprob.tolist(), strict=True):
        tokens = [t for t in row if t != pad_id]
        tokens = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
        out_rows.append(Hypothesis(tokens, value, value))
    return [out_rows[b * num_samples : (b + 1) * num_samples] for b in range(batch)]
