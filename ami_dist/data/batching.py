"""Length-bucketed batches, sharded across ranks deterministically for a seed, resumable from a position.

Every rank computes the same global list of steps for an epoch (from ``seed`` and the epoch number)
and takes its share of each, so ranks never need to talk about data and a run restarted with the
sampler's state continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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
    """Right-padded (N, max_len) int64 tensor, with an optional token before / after each sequence.

    ``seqs`` may be lists or numpy views into a memory-mapped corpus; each row is one copy into the tensor.
    """
    lengths = [len(s) for s in seqs]
    start = int(prefix is not None)
    width = max(lengths, default=0) + start + (suffix is not None)
    out = np.full((len(seqs), max(width, 1)), pad_id, dtype=np.int64)
    if prefix is not None:
        out[:, 0] = prefix
    for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        out[row, start : start + n] = seq
        if suffix is not None:
            out[row, start + n] = suffix
    return torch.from_numpy(out)


def make_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], pad_id: int, bos_id: int,
               eos_id: int) -> Batch:
    """Tensors for one direction: the encoder reads ``src``; the decoder reads BOS+tgt and predicts tgt+EOS."""
    return Batch(
        src=pad_sequences(src, pad_id),
        src_lengths=torch.tensor([max(len(s), 1) for s in src], dtype=torch.long),
        tgt_in=pad_sequences(tgt, pad_id, prefix=bos_id),
        tgt_out=pad_sequences(tgt, pad_id, suffix=eos_id),
    )


def padded_tokens(src_lengths: Sequence[int] | np.ndarray, tgt_lengths: Sequence[int] | np.ndarray) -> int:
    """Tokens one rank-batch costs, as a token budget counts them: rows x its widest example.

    An example's width is ``max(source, target + 1)``: the decoder reads BOS + target and predicts
    target + EOS, so its side is one longer than the target. The wider side bounds both padded tensors.
    """
    src, tgt = np.asarray(src_lengths, dtype=np.int64), np.asarray(tgt_lengths, dtype=np.int64)
    if src.size == 0:
        return 0
    return int(src.size * max(int(src.max()), int(tgt.max()) + 1))


def padding_fraction(batches: Iterable[Sequence[int] | np.ndarray], src_lengths: Sequence[int] | np.ndarray,
                     tgt_lengths: Sequence[int] | np.ndarray) -> float:
    """Share of the computed tokens of ``batches`` (lists of example indices) that are padding.

    Each side is padded on its own, as the model sees it: a batch of n examples computes
    ``n * max(source) + n * max(target + 1)`` tokens of which ``sum(source) + sum(target + 1)`` are real.
    """
    src, tgt = np.asarray(src_lengths, dtype=np.int64), np.asarray(tgt_lengths, dtype=np.int64) + 1
    real = computed = 0
    for batch in batches:
        rows = np.asarray(batch, dtype=np.int64)
        if rows.size == 0:
            continue
        s, t = src[rows], tgt[rows]
        real += int(s.sum()) + int(t.sum())
        computed += rows.size * (int(s.max()) + int(t.max()))
    return 1.0 - real / computed if computed else 0.0


def check_layout(layout_world: int, world: int, batch_tokens: int) -> None:
    """Whether token-batched steps laid out for ``layout_world`` ranks can be dealt to ``world`` ranks (a
    ValueError if not): a step may have as few rows as the ranks it was laid out for."""
    if batch_tokens and world > layout_world:
        raise ValueError(
            f"batching by tokens (train.batch_tokens = {batch_tokens}), this run's steps are laid out for the "
            f"{layout_world} ranks it started on, and a step may have as few rows as that: it can continue on at "
            f"most {layout_world} ranks, not {world}"
        )


class ShardedBucketSampler:
    """Yields this rank's batches (lists of example indices) forever, epoch after epoch.

    Within an epoch: shuffle all examples, cut into pools of ``bucket_batches`` steps, sort each pool by
    length, cut it into steps and shuffle the step order. Rank r takes rows r, r + world, ... of each
    (sorted) step, so the ranks of a step get batches of nearly the same lengths: a rank that drew long
    sentences would otherwise hold every other rank at the gradient all-reduce.

    Sentence batching (``batch_tokens == 0``) sorts pools by (source, target) length and cuts steps of
    ``batch_size`` x ``world`` examples; a step with fewer examples than ranks (an epoch's last) is dropped.

    Token batching (``batch_tokens > 0``) sizes each rank-batch by padded tokens instead, so that short
    sentences come in big batches and long ones in small: pools are sorted by width (``max(source,
    target + 1)``, see :func:`padded_tokens`), then source, then target length, and each step takes the
    most consecutive examples (at least ``world``) whose stride deal gives no rank more than
    ``batch_tokens`` padded tokens. Fewer than ``world`` examples left at a pool's end are carried into
    the next pool. At the epoch's end such a remainder joins the epoch's last step if that step still fits
    the budget, otherwise it is dropped: at most ``world - 1`` examples an epoch, and a different few
    each epoch as the permutation changes.
    """

    def __init__(self, src_lengths: Sequence[int] | np.ndarray, tgt_lengths: Sequence[int] | np.ndarray,
                 batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0, bucket_batches: int = 100,
                 batch_tokens: int = 0) -> None:
        if len(src_lengths) != len(tgt_lengths):
            raise ValueError("src_lengths and tgt_lengths differ in length")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        if batch_tokens < 0:
            raise ValueError(f"train.batch_tokens = {batch_tokens} is negative (0 batches by sentences)")
        # int32: a corpus of millions of examples keeps its lengths in a few MB (and numpy input stays numpy)
        self.src_lengths = np.asarray(src_lengths, dtype=np.int32)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int32)
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.rank, self.world, self.seed = rank, world, seed
        self.layout_world = world  # the ranks token-batched steps are laid out for (see load_state_dict)
        self.bucket_batches = bucket_batches
        self.epoch = 0
        self.position = 0  # batches of the current epoch this rank has already yielded
        self._widths = np.maximum(self.src_lengths, self.tgt_lengths + 1)
        if batch_tokens:
            widest = int(self._widths.max(initial=0))
            if widest > batch_tokens:
                raise ValueError(
                    f"train.batch_tokens = {batch_tokens} is smaller than the widest training example "
                    f"({widest} tokens: max(source, target + 1)); raise it to at least {widest}"
                )
            self._lay_out_for(world)
            # any world examples make a step (one row each, none wider than the budget), so with at least
            # world examples an epoch has a step; no need to lay one out here
            enough = len(self._widths) >= world
        else:
            enough = self.batches_per_epoch() > 0
        if not enough:
            size = f"{batch_tokens} tokens" if batch_tokens else f"{batch_size}"
            raise ValueError(
                f"{len(self.src_lengths)} examples make no step of {size} x {world} ranks "
                f"(at least {world} are needed)"
            )

    def _lay_out_for(self, world: int) -> None:
        """Lay token-batched steps out for ``world`` ranks: a pool holds about ``bucket_batches`` steps, the rows
        per rank-batch estimated from the mean width."""
        self.layout_world = world
        mean_width = float(self._widths.mean()) if len(self._widths) else 1.0
        self._pool_size = self.bucket_batches * world * max(1, int(self.batch_tokens // mean_width))

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' steps of ``epoch`` in order (identical on every rank), each sorted by length."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.src_lengths))
        steps = self._token_steps(order) if self.batch_tokens else self._sentence_steps(order)
        step_order = rng.permutation(len(steps))
        return [steps[i] for i in step_order]

    def _sentence_steps(self, order: np.ndarray) -> list[np.ndarray]:
        step = self.batch_size * self.world
        pool = step * self.bucket_batches
        steps: list[np.ndarray] = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.lexsort((self.tgt_lengths[chunk], self.src_lengths[chunk]))]
            steps.extend(chunk[i : i + step] for i in range(0, len(chunk), step))
        return [s for s in steps if len(s) >= self.world]

    def _sort_by_width(self, chunk: np.ndarray) -> np.ndarray:
        return chunk[np.lexsort((self.tgt_lengths[chunk], self.src_lengths[chunk], self._widths[chunk]))]

    def _fits(self, rows: int, width: int) -> bool:
        """Whether a step of ``rows`` examples no wider than ``width`` keeps every rank within budget."""
        return -(-rows // self.layout_world) * width <= self.batch_tokens

    def _token_steps(self, order: np.ndarray) -> list[np.ndarray]:
        steps: list[np.ndarray] = []
        carry = order[:0]
        for start in range(0, len(order), self._pool_size):
            chunk = self._sort_by_width(np.concatenate((carry, order[start : start + self._pool_size])))
            widths = self._widths[chunk]  # ascending: a step's last example is its widest
            first = 0
            while len(chunk) - first >= self.layout_world:
                # the largest m with ceil(m / world) * widths[first + m - 1] <= budget; both factors grow
                # with m, so bisect. m = world always fits (one row per rank, none wider than the budget).
                lo = self.layout_world
                hi = min(len(chunk) - first, self.batch_tokens // int(widths[first]) * self.layout_world)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if self._fits(mid, int(widths[first + mid - 1])):
                        lo = mid
                    else:
                        hi = mid - 1
                steps.append(chunk[first : first + lo])
                first += lo
            carry = chunk[first:]
        if len(carry) and steps:
            merged = self._sort_by_width(np.concatenate((steps[-1], carry)))
            if self._fits(len(merged), int(self._widths[merged[-1]])):
                steps[-1] = merged
            # else: the epoch's last < world examples are dropped (they cannot give every rank a row)
        return steps

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Steps (each rank's batches) in ``epoch`` (None: the current one); token batching varies by epoch."""
        if self.batch_tokens:
            return len(self.global_batches(self.epoch if epoch is None else epoch))
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
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world": self.layout_world,
                "batch_tokens": self.batch_tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` left off, on this sampler's number of ranks.

        The position counts steps, and a step is the same examples on any number of ranks: batching by
        sentences, a step is ``batch_size x world`` examples, the run's global batch, whatever the world; batching
        by tokens, steps are laid out for the number of ranks the run started on (``state["world"]``), each rank
        taking its rows of them, so fewer ranks each take more tokens. More ranks than that are refused there: a
        step laid out for fewer ranks may have fewer rows than ranks.
        """
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state is for seed {state.get('seed')}, this run has seed {self.seed}")
        # states saved before token batching have no key: they batched by sentences
        if int(state.get("batch_tokens", 0)) != self.batch_tokens:
            raise ValueError(
                f"sampler state is for train.batch_tokens = {state.get('batch_tokens', 0)}, this run has "
                f"train.batch_tokens = {self.batch_tokens} (a different budget makes different batches)"
            )
        layout = int(state.get("world", self.world))
        if self.batch_tokens and layout != self.layout_world:
            check_layout(layout, self.world, self.batch_tokens)
            self._lay_out_for(layout)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
