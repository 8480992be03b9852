"""What the resume preflight costs at 16 ranks with a large model: every rank reads every checkpoint file.

Before the ranks of a resumed run meet, each one runs ``check_resumable`` (``ami_dist/distributed/safe_load.py``):
it unpickles every ``.pt`` file of the checkpoint with ``weights_only=True`` (memory-mapped: the pickles are
read, the tensor data is not) so that a truncated or hostile file is one line before anything starts. This
measures that against the alternative of each rank reading only its own shard (its optimizer-state file of
each network, the model-states file, its rank file), with 16 processes started together, page cache cold
(every file evicted with ``posix_fadvise(DONTNEED)`` first) and warm.

The checkpoint is the paper's NMT LSTM (configs/nmt_lstm.yaml: 4 x 1024 LSTM layers, an 8k vocabulary, SGD; the
forward and backward networks, AMI off), trained one step on 1 rank by ami_dist/train.py and then laid out as 16
ranks' ZeRO-2 files: the rank-0 optimizer-state dict cut into 16 flat partitions with their fragment maps
(what DeepSpeed's own 16-rank files hold, to its alignment padding), the model-states file as written.

    .venv/bin/python benchmarks/resume_preread.py               # 16 ranks
    .venv/bin/python benchmarks/resume_preread.py --ranks 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

READER = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
mode, run_dir, rank, go = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
from ami_dist.config import load_config
from ami_dist.distributed.safe_load import _deepspeed_globals, check_resumable, safe_torch_load
from ami_dist.run_dir import RunDir
_deepspeed_globals()  # imports DeepSpeed (seconds of CPU): a fixed cost the run pays anyway, not reading
cfg = load_config(RunDir(run_dir).config)
root = RunDir(run_dir).checkpoints
tag = (root / "latest").read_text().strip()
while not go.exists():
    time.sleep(0.01)
io = lambda: dict(l.split(": ") for l in open("/proc/self/io").read().split("\n") if l)
before, faults, start = io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt, time.perf_counter()
if mode == "all":
    check_resumable(run_dir, tag, cfg)
else:
    own = [root / "ranks" / tag / f"rank{rank}.pt"]
    for network in ("forward", "backward"):
        own += [root / network / tag / "mp_rank_00_model_states.pt",
                root / network / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
    for path in own:
        safe_torch_load(path, "cpu", mmap=True)
took, after = time.perf_counter() - start, io()
print(json.dumps({"s": took, "read_bytes": int(after["read_bytes"]) - int(before["read_bytes"]),
                  "rchar": int(after["rchar"]) - int(before["rchar"]),
                  "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
                  "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def train_one_step(work: Path) -> Path:
    """A real 1-rank checkpoint of the paper's NMT LSTM after one SGD step."""
    run_dir = work / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(ROOT / "ami_dist/train.py"), "--config", str(ROOT / "configs/nmt_lstm.yaml"),
           "--run_dir", str(run_dir), "train.mle_steps=1", "train.batch_size=8", "ami.enabled=false",
           f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "data.valid_limit=8",
           f"data.cache_dir={work / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return run_dir


def lay_out_for(run_dir: Path, ranks: int) -> None:
    """Rewrite the 1-rank checkpoint as ``ranks`` ranks' ZeRO-2 files (flat partitions cut evenly)."""
    import torch
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )
    from deepspeed.utils.tensor_fragment import fragment_address

    from ami_dist.run_dir import RunDir

    root = RunDir(run_dir).checkpoints
    tag = (root / "latest").read_text().strip()
    for network in ("forward", "backward"):
        one = root / network / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        whole = torch.load(one, weights_only=False)
        optim = whole[OPTIMIZER_STATE_DICT]
        flat = optim[SINGLE_PARTITION_OF_FP32_GROUPS][0]
        mapping = optim[PARAM_SLICE_MAPPINGS][0]  # name -> (numel, start) in the one flat
        size = -(-flat.numel() // ranks)
        for r in range(ranks):
            lo, hi = r * size, min((r + 1) * size, flat.numel())
            part = dict(whole)
            part[OPTIMIZER_STATE_DICT] = dict(optim)
            part[OPTIMIZER_STATE_DICT][SINGLE_PARTITION_OF_FP32_GROUPS] = [flat[lo:hi].clone()]
            part[OPTIMIZER_STATE_DICT][BASE_OPTIMIZER_STATE] = {
                **optim[BASE_OPTIMIZER_STATE],
                "state": {0: {k: v[lo:hi].clone() if v.dim() else v
                              for k, v in optim[BASE_OPTIMIZER_STATE]["state"].get(0, {}).items()}}}
            part[OPTIMIZER_STATE_DICT]["partition_count"] = [ranks]
            part[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS] = [{
                name: fragment_address(numel=min(hi, f.start + f.numel) - max(lo, f.start),
                                       start=max(lo, f.start) - lo)
                for name, f in mapping.items() if f.start < hi and f.start + f.numel > lo}]
            torch.save(part, root / network / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    rank0 = torch.load(root / "ranks" / tag / "rank0.pt", weights_only=False)
    for r in range(1, ranks):
        torch.save(rank0, root / "ranks" / tag / f"rank{r}.pt")


def evict(run_dir: Path) -> None:
    for path in run_dir.rglob("*.pt"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(run_dir: Path, ranks: int, mode: str, cold: bool) -> list[dict]:
    go = run_dir.parent / "go"
    go.unlink(missing_ok=True)
    if cold:
        evict(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(ROOT), mode, str(run_dir), str(r), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(ranks)]
    time.sleep(max(5.0, ranks * 0.6))  # every process imported and waiting
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            sys.exit(err[-2000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="preread-") as tmp:
        work = Path(tmp)
        print("training one step of configs/nmt_lstm.yaml on 1 rank ...", flush=True)
        run_dir = train_one_step(work)
        lay_out_for(run_dir, args.ranks)
        files = sorted(run_dir.joinpath("checkpoints").rglob("*.pt"))
        total = sum(f.stat().st_size for f in files)
        print(f"checkpoint: {len(files)} files, {total / 2**20:.0f} MiB, laid out for {args.ranks} ranks", flush=True)
        rows = {}
        for cold in (True, False):
            for mode in ("all", "own"):
                r = measure(run_dir, args.ranks, mode, cold)
                rows[(cold, mode)] = {"slowest_s": max(x["s"] for x in r),
                                      "read_mib": sum(x["read_bytes"] for x in r) / 2**20,
                                      "rchar_mib": sum(x["rchar"] for x in r) / 2**20,
                                      "faults": sum(x["major_faults"] for x in r),
                                      "rss_mib": max(x["rss_kb"] for x in r) / 1024}
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\n{args.ranks} processes at once, each reading: all = every file (check_resumable, today), "
          "own = its own shard only")
    print(f"{'cache':6} {'files':5} {'slowest rank s':>14} {'disk reads MiB':>14} {'read() MiB':>10} "
          f"{'major faults':>12} {'peak RSS MiB':>12}  (all ranks' sums; RSS: the largest, imports included)")
    for (cold, mode), v in rows.items():
        print(f"{'cold' if cold else 'warm':6} {mode:5} {v['slowest_s']:14.2f} {v['read_mib']:14.1f} "
              f"{v['rchar_mib']:10.1f} {v['faults']:12d} {v['rss_mib']:12.0f}")
    for cold in (True, False):
        a, o = rows[(cold, "all")], rows[(cold, "own")]
        print(f"{'cold' if cold else 'warm'} cache: all / own = {a['slowest_s'] / o['slowest_s']:.2f}x the slowest "
              f"rank's time, {a['rchar_mib'] / max(o['rchar_mib'], 1e-9):.1f}x the bytes read")


if __name__ == "__main__":
    main()
