"""All-reduce, reduce-scatter and all-gather between the ranks of one machine through a shared-memory segment.

On CPU, every byte of a gloo collective goes through a loopback TCP socket: the kernel copies it out of one
process and into the other, and gloo reduces it in between. Between ranks that share a machine, a segment
mapped into every rank does the same with plain memory copies. The data goes through in chunks that stay in
cache, and a barrier (a one-element gloo all-reduce, ~0.15 ms) separates writing a chunk from reading it.

One round of the all-reduce, for ranks 0..W-1 and chunks of C elements (rank r's chunk: the elements
[r·C, (r+1)·C) of the round's W·C):

    every rank copies the round's elements of its tensors but its own chunk into its own slot   barrier
    rank r adds up its chunk of its tensors and of every other slot into the result area,
      and copies the sum into its tensors                                                          barrier
    every rank copies the other ranks' chunks of the result area into its tensors

so each rank reads and writes its data about twice and sums 1/W of it, where gloo sends all of it
through the socket twice. On the 2-core development machine, 19M float32 between 2 ranks: gloo 60-69 ms,
this 31-34 ms; see benchmarks/gloo_collectives.py. Where each rank needs only the sums of its own share
(ZeRO-2's gradients), the reduce-scatter skips the last step and half the copies (30M float32: 28-31 ms
against the all-reduce's 47-54).

:func:`shared_tensor` maps a tensor into every rank of a group the same way, for data that all of them
read and each writes a part of (ZeRO's flat weights, see deepspeed_adapter/zero_cpu.share_weights_between_ranks).

The ranks must agree on every call (same sizes, same order), as for any collective. Whether a group can
use the segment is decided once, collectively, by :meth:`SharedMemoryGroup.attach`: rank 0 creates a file
in /dev/shm with a random name and a random stamp, every other rank opens it and checks the stamp, and
the file is unlinked as soon as everyone has it mapped, or as soon as attaching fails (a segment is left
only where rank 0 is killed in between, and the next attach on that machine removes it). A rank on another
machine does not find the file, so the group falls back to gloo, on all ranks.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 4 << 20  # per rank and round; of 1, 4 and 16 MiB tried on 2 ranks, 4 was fastest
_STAMP_BYTES = 16
_PREFIX = "ami-dist-"
_ALIGN = 64


def _map(path: str, stamp: bytes, size: int) -> torch.Tensor | None:
    """The segment at ``path``, mapped, if it is there and carries ``stamp``; its pages faulted in."""
    try:
        descriptor = os.open(path, os.O_RDWR)  # no O_CREAT: on another machine, the file is not there
        os.close(descriptor)
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    except (OSError, RuntimeError):
        return None
    if bytes(buffer[size - _STAMP_BYTES:].tolist()) != stamp:
        return None
    buffer[: size - _STAMP_BYTES].zero_()  # now, rather than in the first step
    return buffer


def _remove_orphans(directory: str) -> None:
    """Remove segments whose creator is gone: rank 0 unlinks its segment once every rank has mapped it,
    so one is left only where rank 0 was killed in between. A live creator's segment is left alone."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        creator = name[len(_PREFIX):].split("-", 1)[0]
        if not creator.isdigit():
            continue
        try:
            os.kill(int(creator), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
        except OSError:
            pass  # alive, someone else's


def _attach_segment(group: Any, size: int, directory: str) -> torch.Tensor | None:
    """``size`` bytes of shared memory mapped into every rank of ``group`` (zeroed, the last _STAMP_BYTES
    excepted), or None on every rank when some rank cannot map it (see the module docstring). A collective."""
    rank = dist.get_rank(group)
    stamp = uuid.uuid4().bytes
    path = ""
    if rank == 0:
        _remove_orphans(directory)
        path = os.path.join(directory, f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            path = ""
        else:
            try:
                # Reserve every page now: a /dev/shm too small for the segment (Docker's is 64 MB unless
                # --shm-size says otherwise) fails here, and the group falls back to gloo, where a sparse
                # file would kill the rank that first touched a page beyond the limit (SIGBUS).
                os.posix_fallocate(descriptor, 0, size)
                os.pwrite(descriptor, stamp, size - _STAMP_BYTES)
            except OSError:
                os.unlink(path)
                path = ""
            finally:
                os.close(descriptor)
    try:
        shared = [path, stamp]
        dist.broadcast_object_list(shared, src=global_rank(group, 0), group=group)
        buffer = _map(shared[0], shared[1], size) if shared[0] else None
        mapped = torch.tensor([int(buffer is not None)], dtype=torch.int32)
        dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=group)
    finally:  # every rank has mapped it or given up (or a rank died): the mappings outlive the name
        if rank == 0 and path:
            os.unlink(path)
    return buffer if int(mapped) else None


def shared_tensor(group: Any, numel: int, dtype: torch.dtype, directory: str = "/dev/shm") -> torch.Tensor | None:
    """A zeroed 1-D tensor of ``numel`` elements that every rank of ``group`` maps: what one rank writes,
    the others read. None on every rank where some rank cannot map it (as on another machine), or for a
    group of one. A collective: every rank calls it with the same arguments but ``directory``."""
    if dist.get_world_size(group) == 1:
        return None
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    size = -(-nbytes // _ALIGN) * _ALIGN + _STAMP_BYTES
    buffer = _attach_segment(group, size, directory)
    return None if buffer is None else buffer[:nbytes].view(dtype)


def global_rank(group: Any, group_rank: int) -> int:
    """The global rank of ``group``'s rank ``group_rank`` (None: the world, where the two are the same)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class SharedMemoryGroup:
    """A shared-memory segment mapped by every rank of a process group (see the module docstring)."""

    def __init__(self, buffer: torch.Tensor, group: Any, chunk_bytes: int) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.chunk_bytes = chunk_bytes
        self._slot_bytes = chunk_bytes * self.world
        self._buffer = buffer
        self._views: dict[torch.dtype, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._token = torch.zeros(1, dtype=torch.int32)
        self.calls = {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0}  # how many went through the segment

    @staticmethod
    def size_bytes(world: int, chunk_bytes: int) -> int:
        """The segment: one slot of world·chunk_bytes per rank, a result area of the same size, the stamp."""
        return (world + 1) * world * chunk_bytes + _STAMP_BYTES

    @classmethod
    def attach(cls, group: Any = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               directory: str = "/dev/shm") -> SharedMemoryGroup | None:
        """Map one segment into every rank of ``group``; None on every rank when some rank cannot.

        A collective: every rank of the group calls it, with the same arguments but ``directory``.
        """
        if chunk_bytes <= 0 or chunk_bytes % _ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {_ALIGN}, got {chunk_bytes}")
        world = dist.get_world_size(group)
        if world == 1:
            return None
        buffer = _attach_segment(group, cls.size_bytes(world, chunk_bytes), directory)
        return None if buffer is None else cls(buffer, group, chunk_bytes)

    def barrier(self) -> None:
        dist.all_reduce(self._token, group=self.group)

    def _slots(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each rank's slot and the result area, as flat tensors of ``dtype``."""
        if dtype not in self._views:
            slot = self._slot_bytes
            slots = [self._buffer[k * slot:(k + 1) * slot].view(dtype) for k in range(self.world)]
            result = self._buffer[self.world * slot:(self.world + 1) * slot].view(dtype)
            self._views[dtype] = (slots, result)
        return self._views[dtype]

    def all_reduce_(self, tensors: Sequence[torch.Tensor], divide_by: float | None = None) -> None:
        """Sum ``tensors`` (contiguous, on CPU, one dtype) over the ranks, in place, as if concatenated.

        The sum runs over the ranks in group order, and ``divide_by`` (if given) divides it afterwards.
        """
        flat = _flat_views(tensors)
        self.calls["all_reduce"] += 1
        if not flat:
            return
        slots, result = self._slots(flat[0].dtype)
        chunk = self.chunk_bytes // flat[0].element_size()
        per_round = chunk * self.world
        starts = _starts(flat)
        for offset in range(0, starts[-1], per_round):
            count = min(per_round, starts[-1] - offset)
            mine = (min(self.rank * chunk, count), min((self.rank + 1) * chunk, count))
            # The others need every part of this rank's tensors but the one it sums itself.
            for piece, lo, hi in _pieces(flat, starts, offset, count):
                for a, b in _outside(lo, hi, *mine):
                    slots[self.rank][a:b].copy_(piece[a - lo:b - lo])
            self.barrier()
            for piece, lo, hi in _pieces(flat, starts, offset + mine[0], mine[1] - mine[0]):
                lo, hi = lo + mine[0], hi + mine[0]
                operands = [piece if k == self.rank else slots[k][lo:hi] for k in range(self.world)]
                piece.copy_(_sum_in_order(operands, result[lo:hi], divide_by))
            self.barrier()
            for piece, lo, hi in _pieces(flat, starts, offset, count):
                for a, b in _outside(lo, hi, *mine):
                    piece[a - lo:b - lo].copy_(result[a:b])

    def reduce_scatter_(self, shares: Sequence[Sequence[torch.Tensor]], divide_by: float | None = None) -> None:
        """Sum each rank's share over the ranks, in place, where that rank alone needs the sum.

        ``shares[k]`` are the tensors (contiguous, on CPU, one dtype) whose sum rank k needs, as if
        concatenated; every rank passes the same sizes. On return this rank's own share holds the sum over
        the ranks, in group order (as :meth:`all_reduce_` computes it, bit for bit), divided by
        ``divide_by`` if given; the other shares are left as they were.

        Each round, every rank copies the next C elements of every other rank's share into its slot, and
        after a barrier each rank adds its own next C elements and the others' copies of them. The slots
        alternate between two halves from round to round, so a rank may write the next round while another
        still reads this one: one barrier per round. Half the traffic of the all-reduce, whose second half
        brings every rank the sums that only their owners use.
        """
        if len(shares) != self.world:
            raise ValueError(f"a reduce-scatter takes one share per rank ({self.world}), got {len(shares)}")
        flats = [_flat_views(share) for share in shares]
        present = [f[0] for f in flats if f]
        if any(t.dtype != present[0].dtype for t in present):
            raise ValueError("a shared-memory reduce-scatter takes tensors of one dtype")
        self.calls["reduce_scatter"] += 1
        if not present:
            return
        starts = [_starts(f) for f in flats]
        slots, _ = self._slots(present[0].dtype)
        region = self.chunk_bytes // 2 // present[0].element_size()  # per rank, round and half of a slot
        half = region * self.world
        own = self.rank
        for round_index, offset in enumerate(range(0, max(s[-1] for s in starts), region)):
            base = (round_index % 2) * half
            for k in range(self.world):
                if k != own:
                    count = max(0, min(region, starts[k][-1] - offset))
                    for piece, lo, hi in _pieces(flats[k], starts[k], offset, count):
                        slots[own][base + k * region + lo:base + k * region + hi].copy_(piece)
            self.barrier()
            count = max(0, min(region, starts[own][-1] - offset))
            for piece, lo, hi in _pieces(flats[own], starts[own], offset, count):
                at = base + own * region
                operands = [piece if k == own else slots[k][at + lo:at + hi] for k in range(self.world)]
                # Ranks 0 and 1 sum into their gradients; from rank 2 on, that would overwrite an operand
                # before adding it, so the sum goes through the rank's own (unused) region of its slot.
                total = _sum_in_order(operands, piece if own < 2 else slots[own][at + lo:at + hi], divide_by)
                if total is not piece:
                    piece.copy_(total)
        self.barrier()  # the next collective writes the slots again

    def all_gather_into(self, output: torch.Tensor, input_: torch.Tensor) -> None:
        """``dist.all_gather_into_tensor``: rank k's ``input_`` lands in the k-th of ``world`` equal parts
        of ``output`` (contiguous, on CPU). ``input_`` may be this rank's own part of ``output``."""
        mine = input_.reshape(-1)
        parts = output.view(-1).split(mine.numel())
        if len(parts) != self.world or parts[-1].numel() != mine.numel():
            raise ValueError(f"all-gather output of {output.numel()} elements is not {self.world} × the "
                             f"input's {mine.numel()}")
        self.calls["all_gather"] += 1
        if parts[self.rank].data_ptr() != mine.data_ptr():
            parts[self.rank].copy_(mine)
        slots, _ = self._slots(mine.dtype)
        per_round = self._slot_bytes // mine.element_size()
        for offset in range(0, mine.numel(), per_round):
            count = min(per_round, mine.numel() - offset)
            slots[self.rank][:count].copy_(parts[self.rank][offset:offset + count])
            self.barrier()
            for k in range(self.world):
                if k != self.rank:
                    parts[k][offset:offset + count].copy_(slots[k][:count])
            self.barrier()


def _sum_in_order(operands: list[torch.Tensor], out: torch.Tensor, divide_by: float | None) -> torch.Tensor:
    """``out`` = the sum of ``operands`` (2 or more) in their order, divided by ``divide_by`` if given: the
    one way every collective here adds, so that they agree bit for bit. ``out`` may be the first or the
    second operand, not a later one (it would be overwritten before it is added)."""
    torch.add(operands[0], operands[1], out=out)
    for operand in operands[2:]:
        out.add_(operand)
    if divide_by is not None:
        out.div_(divide_by)
    return out


def _flat_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    flat = [t.view(-1) for t in tensors if t.numel()]
    if flat and any(t.dtype != flat[0].dtype or t.device.type != "cpu" for t in flat):
        raise ValueError("a shared-memory all-reduce takes CPU tensors of one dtype")
    return flat


def _starts(flat: list[torch.Tensor]) -> list[int]:
    """Where each tensor starts in their concatenation, and (last) its length."""
    starts = [0]
    for t in flat:
        starts.append(starts[-1] + t.numel())
    return starts


def _outside(lo: int, hi: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of [lo, hi) before ``start`` and after ``end``."""
    if min(hi, start) > lo:
        yield lo, min(hi, start)
    if hi > max(lo, end):
        yield max(lo, end), hi


def _pieces(flat: list[torch.Tensor], starts: list[int], offset: int,
            count: int) -> Iterator[tuple[torch.Tensor, int, int]]:
    """The parts of the concatenation's elements [offset, offset + count), each as (a view into its
    tensor, lo, hi): where it goes in a slot's [0, count)."""
    index = bisect.bisect_right(starts, offset) - 1
    end = offset + count
    while index < len(flat) and starts[index] < end:
        lo, hi = max(starts[index], offset), min(starts[index + 1], end)
        yield flat[index][lo - starts[index]:hi - starts[index]], lo - offset, hi - offset
        index += 1
