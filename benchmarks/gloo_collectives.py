"""Gloo's all-gather against the broadcasts ami-dist uses in its place (distributed/comm.py).

ZeRO-1/2 gather every rank's slice of the updated weights after each optimizer step. Launched on 2
local ranks with 1 thread each (as the 2-rank training benchmark runs), this times, on a buffer the
size of the dialog LSTM's weights: gloo's all_gather_into_tensor, ami-dist's all_gather_by_broadcast,
and for scale the all-reduce of the whole buffer that ZeRO-2 does with the gradients.

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

    from ami_dist.distributed.comm import all_gather_by_broadcast

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = numel // world
    output = torch.empty(share * world)
    mine = torch.randn(share)
    expected = torch.empty_like(output)
    dist.all_gather_into_tensor(expected, mine)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            dist.barrier()
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times[1:])  # the first call sets up buffers

    gloo = timed(lambda: dist.all_gather_into_tensor(output, mine))
    ours = timed(lambda: all_gather_by_broadcast(output, mine))
    if not torch.equal(output, expected):
        raise SystemExit("all_gather_by_broadcast gathered something else than gloo's all-gather")
    reduce = timed(lambda: dist.all_reduce(output))
    if rank == 0:
        mb = share * 4 / 2**20
        print(f"{world} ranks, {mb:.0f} MB per rank ({share * world:,} float32), median of {repeats - 1} calls")
        print(f"  gloo all_gather_into_tensor   {gloo:7.1f} ms")
        print(f"  all_gather_by_broadcast       {ours:7.1f} ms   {gloo / ours:.2f}x faster than gloo's all-gather")
        print(f"  all_reduce of the whole       {reduce:7.1f} ms   (ZeRO-2's gradient reduction, for scale)")
    dist.destroy_process_group()


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
