"""Per-rank memory of each ZeRO stage at 1, 2 and 4 ranks, on the paper's NMT LSTM (configs/nmt_lstm.yaml: SGD,
an 8k vocabulary, the forward, backward and noise networks), batch 8, three MLE steps.

    .venv/bin/python benchmarks/zero_memory.py                      # 1, 2, 4 ranks x ZeRO 1, 2, 3 (CPU, gloo)
    .venv/bin/python benchmarks/zero_memory.py --ranks 4 --stages 2,3

Per rank, each configuration in its own processes (torchrun):
  model states  bytes of the tensors the three engines hold, counted once per storage, each engine at the
                largest of its steps (just before the update, gradients in hand): weights (ZeRO-3: the rank's
                partitions), master copies, gradients, optimizer state, and the buffers ZeRO keeps for them
                (buckets, flat gradient buffers)
  built         resident memory once the engines are built, less the resident memory before the first network
  peak, steady  peak resident memory of the process (ru_maxrss) and resident memory after the third step
On a GPU the worker takes the bf16 presets and also reports torch.cuda.max_memory_allocated (gpu peak).
Ratios are to the 1-rank run of the same stage and to the 1-rank ZeRO-2 run (the smallest one-process
footprint), all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_tensor_bytes(roots: list[Any]) -> int:
    """Bytes of every tensor reachable from ``roots`` through attributes, lists, tuples and dicts of
    DeepSpeed's, PyTorch's and ami-dist's objects, each storage counted once."""
    import torch

    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            if hasattr(obj, "__dict__"):  # ZeRO-3 hangs its partition (ds_tensor) on the parameter
                stack.extend(vars(obj).values())
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set):
            stack.extend(obj)
        elif isinstance(obj, torch.nn.Module):
            stack.extend(obj.parameters())
            stack.extend(obj.buffers())
            stack.append(vars(obj))
        elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "ami_dist") and hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    storages.pop(0, None)  # empty storages
    return sum(storages.values())


def worker(stage: int, out: str) -> None:
    import torch

    from ami_dist.config import load_config
    from ami_dist.data.prepare import ensure_prepared
    from ami_dist.distributed import init_distributed
    from ami_dist.tracking import NullTracker
    from ami_dist.training.build import build_run, make_run_dir, resolve_deepspeed
    from ami_dist.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/nmt_lstm.yaml", [
            "train.batch_size=8", "train.mle_steps=3", "train.stop_after_steps=3", "train.log_every=1",
            "train.valid_every=0", "train.save_every=0", "train.threads_per_rank=1", "tracking.enabled=false",
            f"run.output_dir={tmp}", f"data.cache_dir={os.environ['ZERO_MEMORY_CACHE']}"])
        comm = init_distributed(cfg.distributed.timeout_s, cfg.train.threads_per_rank,
                                cfg.distributed.deepspeed_adapter)
        preset = f"configs/ds_zero{stage}{'_gpu_bf16' if torch.cuda.is_available() else ''}.json"
        ds_configs = resolve_deepspeed(cfg, preset, comm.world_size)
        prepared = ensure_prepared(cfg, show=False)
        run_dir = make_run_dir(cfg, comm)
        before = rss()
        run = build_run(cfg, comm, run_dir, NullTracker(), ds_configs, preset, prepared)
        built = rss() - before
        engines = [net.engine for net in run.networks] + ([run.noise] if run.noise is not None else [])
        held = [held_tensor_bytes([e]) for e in engines]  # as built; each engine's largest, at its steps
        for index, engine in enumerate(engines):
            def step(*args: Any, _index: int = index, _step: Any = engine.step, **kwargs: Any) -> Any:
                held[_index] = max(held[_index], held_tensor_bytes([engines[_index]]))  # gradients in hand
                return _step(*args, **kwargs)

            engine.step = step
        import ami_dist.training.checkpoint as checkpoint

        checkpoint.save_checkpoint = lambda run: None  # three steps measured, nothing written
        train(run)
        steady = rss()
        result = {"rank": comm.rank, "world": comm.world_size, "stage": stage, "model_states": sum(held),
                  "built": built, "steady": steady,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "gpu_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                  "params": sum(getattr(p, "ds_numel", p.numel()) for e in engines for p in e.module.parameters())}
        results = comm.gather(result)
        if comm.is_main:
            Path(out).write_text(json.dumps(results))


def measure(stage: int, ranks: int, cache: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "ZERO_MEMORY_CACHE": cache}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        me = [str(Path(__file__).resolve()), "--worker", str(stage), "--out", str(out)]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                str(29870 + 3 * stage + ranks), *me] if ranks > 1 else [sys.executable, *me])
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--json", help="also write every rank's figures here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from ami_dist.distributed.comm import exit_worker

        worker(args.worker, args.out)
        exit_worker()
    ranks = [int(r) for r in args.ranks.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    cache = tempfile.mkdtemp(prefix="zero-memory-")
    results: dict[tuple[int, int], list[dict]] = {}
    for stage in stages:
        for n in ranks:
            print(f"ZeRO-{stage}, {n} rank(s) ...", flush=True)
            results[(stage, n)] = measure(stage, n, cache)

    def mb(x: float) -> str:
        return f"{x / 2**20:7.0f}"

    def worst(rows: list[dict], key: str) -> float:
        return max(r[key] for r in rows)

    params = next(iter(results.values()))[0]["params"]
    print(f"\nconfigs/nmt_lstm.yaml, {params / 1e6:.1f}M parameters in 3 networks, batch 8, 3 MLE steps; "
          "MB per rank (the largest over ranks)")
    print(f"{'stage':>5} {'ranks':>5} {'model states':>12} {'built':>7} {'steady':>7} {'peak':>7} "
          f"{'states vs 1 rank':>16} {'vs ZeRO-2 1 rank':>16}")
    one_z2 = results.get((2, 1))
    for (stage, n), rows in results.items():
        one = results.get((stage, 1))
        states = worst(rows, "model_states")
        vs_one = f"{states / worst(one, 'model_states'):.2f}x" if one else "-"
        vs_z2 = f"{states / worst(one_z2, 'model_states'):.2f}x" if one_z2 else "-"
        gpu = f" gpu peak {mb(worst(rows, 'gpu_peak'))}" if rows[0]["gpu_peak"] is not None else ""
        print(f"{stage:>5} {n:>5} {mb(states):>12} {mb(worst(rows, 'built'))} {mb(worst(rows, 'steady'))} "
              f"{mb(worst(rows, 'peak'))} {vs_one:>16} {vs_z2:>16}{gpu}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"zero{s}_{n}": r for (s, n), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
