"""Length-bucketed batches, sharded across ranks deterministically for a seed, resumable from a position.

Every rank computes the same global list of steps for an epoch (from ``seed`` and the epoch number)
and takes its share of each, so ranks never need to talk about data and a run restarted with the
sampler's state continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """One direction of a batch: ``src`` (B, S) with lengths, teacher-forcing input and gold output (B, T)."""

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor

    def __len__(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device`` (the engine's: CPU here, the rank's GPU on a cluster)."""
        return Batch(*(t.to(device, non_blocking=True) for t in (self.src, self.src_lengths, self.tgt_in,
                                                                  self.tgt_out)))


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, prefix: int | None = None,
                  suffix: int | None = None) -> torch.Tensor:
    """Right-padded (N, max_len) int64 tensor, with an optional token before / after each sequence."""
    extra = (prefix is not None) + (suffix is not None)
    width = max((len(s) for s in seqs), default=0) + extra
    out = torch.full((len(seqs), max(width, 1)), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        items = ([prefix] if prefix is not None else []) + list(seq) + ([suffix] if suffix is not None else [])
        out[row, : len(items)] = torch.as_tensor(items, dtype=torch.long)
    return out


def make_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], pad_id: int, bos_id: int,
               eos_id: int) -> Batch:
    """Tensors for one direction: the encoder reads ``src``; the decoder reads BOS+tgt and predicts tgt+EOS."""
    return Batch(
        src=pad_sequences(src, pad_id),
        src_lengths=torch.tensor([max(len(s), 1) for s in src], dtype=torch.long),
        tgt_in=pad_sequences(tgt, pad_id, prefix=bos_id),
        tgt_out=pad_sequences(tgt, pad_id, suffix=eos_id),
    )


class ShardedBucketSampler:
    """Yields this rank's batches (lists of example indices) forever, epoch after epoch.

    Within an epoch: shuffle all examples, cut into pools of ``bucket_batches`` steps, sort each pool by
    (source, target) length, cut it into steps of ``batch_size`` x ``world`` examples and shuffle the step
    order. Rank r takes rows r, r + world, ... of each (sorted) step, so the ranks of a step get batches
    of nearly the same lengths: a rank that drew long sentences would otherwise hold every other rank at
    the gradient all-reduce. A step with fewer examples than ranks (an epoch's last) is dropped.
    """

    def __init__(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], batch_size: int, *,
                 rank: int = 0, world: int = 1, seed: int = 0, bucket_batches: int = 100) -> None:
        if len(src_lengths) != len(tgt_lengths):
            raise ValueError("src_lengths and tgt_lengths differ in length")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.bucket_batches = bucket_batches
        self.epoch = 0
        self.position = 0  # batches of the current epoch this rank has already yielded
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"{len(self.src_lengths)} examples make no step of {batch_size} x {world} ranks "
                f"(at least {world} are needed)"
            )

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' steps of ``epoch`` in order (identical on every rank), each sorted by length."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.src_lengths))
        step = self.batch_size * self.world
        pool = step * self.bucket_batches
        steps: list[np.ndarray] = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.lexsort((self.tgt_lengths[chunk], self.src_lengths[chunk]))]
            steps.extend(chunk[i : i + step] for i in range(0, len(chunk), step))
        steps = [s for s in steps if len(s) >= self.world]
        step_order = rng.permutation(len(steps))
        return [steps[i] for i in step_order]

    def batches_per_epoch(self) -> int:
        step = self.batch_size * self.world
        full_pools, rest = divmod(len(self.src_lengths), step * self.bucket_batches)
        full_steps, tail = divmod(rest, step)
        return full_pools * self.bucket_batches + full_steps + (tail >= self.world)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch``: its rows of every step."""
        return [step[self.rank :: self.world] for step in self.global_batches(epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield batch.tolist()
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("world", self.world) != self.world or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"sampler state is for seed {state.get('seed')} and {state.get('world')} ranks, "
                f"this run has seed {self.seed} and {self.world} ranks"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
