"""Greedy decoding, in lockstep across ranks when the network's parameters are sharded (ZeRO-3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ami_dist.models.seq2seq import Seq2Seq


def _local(done: bool) -> bool:
    return done


@torch.no_grad()
def greedy_decode(model: Seq2Seq, src: torch.Tensor, src_lengths: torch.Tensor, *, bos_id: int, eos_id: int,
                  pad_id: int, max_len: int, all_done: Callable[[bool], bool] = _local) -> list[list[int]]:
    """The argmax token (never padding or BOS) at every step until EOS or ``max_len`` tokens; ids without BOS/EOS.

    ``all_done(local_done)`` must return True only when every rank is done: with ZeRO-3 every rank has
    to run the same number of decoder steps, because each step gathers parameters collectively.
    """
    enc = model.encode(src, src_lengths)
    batch = src.size(0)
    prev = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    steps: list[torch.Tensor] = []
    state = None
    while True:
        local_done = bool(finished.all()) or len(steps) >= max_len
        if all_done(local_done):
            break
        out, state = model.decode(prev, enc, state)
        logits = model.generator(out[:, -1])
        logits[:, pad_id] = float("-inf")
        logits[:, bos_id] = float("-inf")
        prev = logits.argmax(dim=-1, keepdim=True)
        if len(steps) < max_len:
            steps.append(prev.squeeze(1).masked_fill(finished, eos_id))
            finished |= steps[-1] == eos_id
    if not steps:
        return [[] for _ in range(batch)]
    ids = torch.stack(steps, dim=1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in ids]
