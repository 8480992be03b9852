"""Gloo's collectives against what ami-dist uses in their place (distributed/deepspeed_adapter/zero_cpu.py,
shm_collectives.py).

ZeRO-1/2 all-reduce the gradients and gather every rank's slice of the updated weights at each optimizer
step. Launched on 2 local ranks with 1 thread each (as the 2-rank training benchmark runs), this times, on
a buffer the size of the dialog LSTM's weights: gloo's all_gather_into_tensor against ami-dist's
all_gather_by_broadcast (between machines) and its shared-memory all-gather (ranks of one machine), and
gloo's all_reduce against the shared-memory all-reduce, and that against its reduce-scatter
(each rank summing only its own share, which is all ZeRO-2 needs). Each result is checked against gloo's.

Usage: python benchmarks/gloo_collectives.py [--numel 19000000] [--repeats 7] [--ranks 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(numel: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from ami_dist.distributed.comm import exit_worker
    from ami_dist.distributed.deepspeed_adapter.zero_cpu import all_gather_by_broadcast
    from ami_dist.distributed.shm_collectives import SharedMemoryGroup

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = numel // world
    output = torch.empty(share * world)
    mine = torch.randn(share)
    expected = torch.empty_like(output)
    dist.all_gather_into_tensor(expected, mine)

    def timed(fn, setup=lambda: None) -> float:
        times = []
        for _ in range(repeats):
            setup()
            dist.barrier()
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times[1:])  # the first call sets up buffers

    shm = SharedMemoryGroup.attach()
    if shm is None:
        raise SystemExit("the ranks could not map a shared-memory segment (is /dev/shm there and writable?)")

    def check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-6):
            raise SystemExit(f"{what} gave something else than gloo")

    gloo = timed(lambda: dist.all_gather_into_tensor(output, mine))
    ours = timed(lambda: all_gather_by_broadcast(output, mine))
    check(output, expected, "all_gather_by_broadcast")
    shm_gather = timed(lambda: shm.all_gather_into(output, mine))
    check(output, expected, "the shared-memory all-gather")
    grads = torch.randn(share * world)
    summed = grads.clone()
    dist.all_reduce(summed)
    # Each call reduces a fresh copy of the same inputs; the copy is made before the clock starts.
    fresh = grads.clone()
    reduce = timed(lambda: dist.all_reduce(fresh), setup=lambda: fresh.copy_(grads))
    shm_reduce = timed(lambda: shm.all_reduce_([fresh]), setup=lambda: fresh.copy_(grads))
    check(fresh, summed, "the shared-memory all-reduce")
    # ZeRO-2 needs the sum only of the rank's own partition: each rank's share is one W-th of the buffer.
    shares = [list(fresh.split(share))[k:k + 1] for k in range(world)]
    shm_scatter = timed(lambda: shm.reduce_scatter_(shares), setup=lambda: fresh.copy_(grads))
    check(shares[rank][0], summed.split(share)[rank], "the shared-memory reduce-scatter")
    if rank == 0:
        mb = share * 4 / 2**20
        print(f"{world} ranks, {mb:.0f} MB per rank ({share * world:,} float32), median of {repeats - 1} calls")
        print(f"  gloo all_gather_into_tensor   {gloo:7.1f} ms")
        print(f"  all_gather_by_broadcast       {ours:7.1f} ms   {gloo / ours:.2f}x faster than gloo's all-gather")
        print(f"  shared-memory all-gather      {shm_gather:7.1f} ms   {gloo / shm_gather:.2f}x faster than gloo's")
        print(f"  gloo all_reduce of the whole  {reduce:7.1f} ms   (the gradients)")
        print(f"  shared-memory all-reduce      {shm_reduce:7.1f} ms   {reduce / shm_reduce:.2f}x faster than gloo's")
        print(f"  shared-memory reduce-scatter  {shm_scatter:7.1f} ms   {shm_reduce / shm_scatter:.2f}x faster "
              "than the shared-memory all-reduce (ZeRO-2's own partition)")
    exit_worker()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=19_000_000, help="elements gathered in all (float32)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.numel, args.repeats)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port",
           "29657", os.path.abspath(__file__), "--worker", "--numel", str(args.numel), "--repeats", str(args.repeats)]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
