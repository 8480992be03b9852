"""Worker for test_gloo_all_gather: DeepSpeed's all_gather_into_tensor (as ami-dist patches it for gloo)
must give what gloo's own all-gather gives, on the whole world and on a subgroup of non-consecutive ranks.

Run by the test under torchrun with 3 ranks; prints "ok <rank> <patched> <used shared memory>" when every
check holds.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

from ami_dist.distributed.comm import exit_worker
from ami_dist.distributed.deepspeed_adapter import import_deepspeed
from ami_dist.distributed.deepspeed_adapter.zero_cpu import shared_memory_group

deepspeed = import_deepspeed("gloo")
deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120), verbose=False)
import deepspeed.comm as ds_comm  # noqa: E402

rank = dist.get_rank()
subgroup = dist.new_group([0, 2])
for group, members in ((None, [0, 1, 2]), (subgroup, [0, 2])):
    if rank not in members:
        continue
    for shape in ((5,), (2, 3)):
        mine = torch.arange(6, dtype=torch.float32)[: torch.Size(shape).numel()].reshape(shape) + 100 * rank
        out = torch.full((len(members) * shape[0], *shape[1:]), -1.0)
        ds_comm.all_gather_into_tensor(out, mine, group=group)
        expected = torch.empty_like(out)
        dist.all_gather_into_tensor(expected, mine, group=group)  # gloo's own
        if not torch.equal(out, expected):
            sys.exit(f"rank {rank}, group {members}, shape {shape}: got {out.tolist()}, gloo {expected.tolist()}")
    # ZeRO's case: this rank's input is its own slice of the output buffer.
    flat = torch.zeros(4 * len(members))
    index = members.index(rank)
    flat[4 * index : 4 * index + 4] = torch.arange(4.0) + 10 * rank
    ds_comm.all_gather_into_tensor(flat, flat[4 * index : 4 * index + 4], group=group)
    expected = torch.cat([torch.arange(4.0) + 10 * m for m in members])
    if not torch.equal(flat, expected):
        sys.exit(f"rank {rank}, group {members}: in-place gather gave {flat.tolist()}")
patched = getattr(sys.modules["deepspeed.comm.torch"].TorchBackend.all_gather_into_tensor, "ami_dist_patched", False)
dist.barrier()
my_groups = [None] if rank == 1 else [None, subgroup]
used_shm = all(shared_memory_group(g) is not None for g in my_groups)  # attached by the gathers above
sys.stdout.write(f"ok {rank} {patched} {used_shm}\n")  # one write: the ranks share the pipe
exit_worker()
