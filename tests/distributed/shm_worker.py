"""Worker for test_shm_collectives: the shared-memory all-reduce, reduce-scatter and all-gather
(distributed/shm_collectives) against results each rank can work out from every rank's inputs, over many
small rounds, on the world and on a subgroup of non-consecutive ranks; and every rank falling back together
when one cannot map the segment, or it cannot be made (no room for it: nothing is left behind).

Run by the test under torchrun with 3 ranks: ``shm_worker.py DIRECTORY``; prints "ok <rank>" when every
check holds, and exits with a message at the first that does not.
"""

from __future__ import annotations

import datetime
import errno
import os
import sys

import torch
import torch.distributed as dist

from ami_dist.distributed import shm_collectives
from ami_dist.distributed.comm import exit_worker
from ami_dist.distributed.shm_collectives import SharedMemoryGroup

CHUNK_BYTES = 64  # 16 float32 per rank and round: every tensor below crosses several rounds
SIZES = (1, 37, 0, 200, 3, 64)


def inputs(rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(n, generator=g).to(dtype) for n in SIZES]


def shares_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``tensors`` to deal out as reduce-scatter shares: one is cut in two (as ZeRO's partition
    boundary cuts a weight), a 2-D one and an empty one among them."""
    return [tensors[0], tensors[1].reshape(1, -1), tensors[2], tensors[3][:120], tensors[3][120:], tensors[4],
            tensors[5]]


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"rank {dist.get_rank()}: {what}")


def check_group(shm: SharedMemoryGroup, members: list[int]) -> None:
    rank = dist.get_rank()
    for dtype in (torch.float32, torch.float64):
        for divide_by in (None, float(len(members))):
            mine = [t.reshape(1, -1) if t.numel() == 37 else t for t in inputs(rank, dtype)]  # a 2-D one too
            shm.all_reduce_(mine, divide_by=divide_by)
            per_rank = [inputs(m, dtype) for m in members]
            for i, got in enumerate(mine):
                want = per_rank[0][i] + per_rank[1][i]  # the group order, as the segment sums
                for other in per_rank[2:]:
                    want = want + other[i]
                if divide_by is not None:
                    want = want / divide_by
                check(torch.equal(got.reshape(-1), want), f"group {members}, {dtype}, divide {divide_by}, "
                                                          f"tensor {i}: {got.tolist()} != {want.tolist()}")
    index = members.index(rank)
    for dtype in (torch.float32, torch.float64):
        for divide_by in (None, float(len(members))):
            pieces = shares_of(inputs(rank, dtype))
            shares = [pieces[k::len(members)] for k in range(len(members))]
            shm.reduce_scatter_(shares, divide_by=divide_by)
            summed = [t.clone() for t in inputs(rank, dtype)]
            shm.all_reduce_(summed, divide_by=divide_by)
            want_pieces = shares_of(summed)  # this rank's share summed (bit for bit as by all_reduce_) ...
            unchanged = shares_of(inputs(rank, dtype))  # ... and the others' left as they were
            for j, got in enumerate(pieces):
                want = want_pieces[j] if j % len(members) == index else unchanged[j]
                check(torch.equal(got, want), f"group {members}, {dtype}, divide {divide_by}: reduce-scatter "
                                              f"piece {j} (share {j % len(members)}) gave {got.tolist()}")
    for n in (1, 50):
        out = torch.full((len(members) * n,), -1.0)
        shm.all_gather_into(out, torch.arange(n, dtype=torch.float32) + 1000 * rank)
        want = torch.cat([torch.arange(n, dtype=torch.float32) + 1000 * m for m in members])
        check(torch.equal(out, want), f"group {members}: all-gather of {n} gave {out.tolist()}")
    # ZeRO's case: the input is this rank's own part of the output.
    flat = torch.zeros(len(members) * 40, dtype=torch.float64)
    flat[40 * index:40 * index + 40] = torch.arange(40.0) - rank
    shm.all_gather_into(flat, flat[40 * index:40 * index + 40])
    want = torch.cat([torch.arange(40.0, dtype=torch.float64) - m for m in members])
    check(torch.equal(flat, want), f"group {members}: in-place all-gather gave {flat.tolist()}")


def main(directory: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    subgroup = dist.new_group([0, 2])
    for group, members in ((None, [0, 1, 2]), (subgroup, [0, 2])):
        if rank in members:
            shm = SharedMemoryGroup.attach(group, chunk_bytes=CHUNK_BYTES, directory=directory)
            check(shm is not None, f"group {members} could not map a segment")
            assert shm is not None
            check_group(shm, members)
    dist.barrier()
    check(os.listdir(directory) == [], f"segments left behind: {os.listdir(directory)}")
    dist.barrier()  # every rank has looked before rank 0 makes the next segment

    # A rank that cannot see the segment (as on another machine): every rank falls back, none hangs.
    real_open = shm_collectives.os.open
    if rank == 1:
        def missing(path: str, flags: int, *args: int) -> int:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(path)
            return real_open(path, flags, *args)
        shm_collectives.os.open = missing
    check(SharedMemoryGroup.attach(None, chunk_bytes=CHUNK_BYTES, directory=directory) is None,
          "a group with a rank that cannot map the segment did not fall back")
    shm_collectives.os.open = real_open
    check(SharedMemoryGroup.attach(None, directory=os.path.join(directory, "absent")) is None,
          "a group whose segment cannot be created did not fall back")
    # A /dev/shm without room for the segment (Docker's default 64 MB): rank 0 cannot reserve its pages.
    real_fallocate = shm_collectives.os.posix_fallocate

    def full(descriptor: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    shm_collectives.os.posix_fallocate = full
    check(SharedMemoryGroup.attach(None, chunk_bytes=CHUNK_BYTES, directory=directory) is None,
          "a group whose segment does not fit in the directory did not fall back")
    shm_collectives.os.posix_fallocate = real_fallocate
    dist.barrier()
    check(os.listdir(directory) == [], f"segments left behind after the fallbacks: {os.listdir(directory)}")
    sys.stdout.write(f"ok {rank}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_worker()  # see its docstring: no abort at teardown after the work is done
