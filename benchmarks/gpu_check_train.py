"""One step of the GPU check (benchmarks/gpu_check.py): the demo recipe (configs/nmt_demo.yaml, AMI cycles
included) on a world of one, under one DeepSpeed preset, twice: once straight through, once stopped in the
middle of an adversarial forward phase and resumed from its checkpoint in a fresh set of engines.

    python benchmarks/gpu_check_train.py --preset configs/ds_zero2_gpu_bf16.json --out result.json
    python benchmarks/gpu_check_train.py --preset configs/ds_zero2.json --dry --out result.json   # CPU, tiny

Checks, each a field of the JSON it writes: the MLE loss falls (mean of the last ten logged steps of the MLE
stage under 0.8x the first ten's), every logged value is finite and no update was skipped, a checkpoint was
written, and the resumed run logs the uninterrupted run's values after the stop (the largest relative
difference is reported; 0 is bit-exact). Tracking is off: the metrics are recorded in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (mle steps, noise pretraining, noise / forward / backward steps per cycle, cycles, stop after)
SCHEDULES = {"gpu": (200, 20, 4, 8, 8, 2, 228), "dry": (80, 2, 2, 2, 2, 1, 83)}
RESUME_TOLERANCE = 1e-3  # relative, per logged value after the stop; CPU runs are held to 1e-6 (tests/test_resume.py)
NOT_COMPARED = ("train/tgt_tokens_per_s",)  # wall-clock figures


def recorder() -> Any:
    """A Tracker (ami_dist.tracking) that keeps every metric in memory, in ``.metrics[key][step]``."""
    from ami_dist.tracking import NullTracker

    class Recorder(NullTracker):
        def __init__(self) -> None:
            self.metrics: dict[str, dict[int, float]] = {}

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            for key, value in metrics.items():
                self.metrics.setdefault(key, {})[step] = float(value)

    return Recorder()


def overrides(dry: bool, tmp: str) -> list[str]:
    mle, pretrain, noise, fw, bw, cycles, _ = SCHEDULES["dry" if dry else "gpu"]
    values = [f"train.mle_steps={mle}", f"ami.noise_pretrain_steps={pretrain}", f"ami.noise_steps={noise}",
              f"ami.forward_steps={fw}", f"ami.backward_steps={bw}", f"ami.cycles={cycles}", "ami.adv_every=1",
              "train.log_every=1", "train.valid_every=0", "train.save_every=0", "train.stop_after_steps=0",
              "tracking.enabled=false", f"run.output_dir={tmp}/runs", f"data.cache_dir={tmp}/prepared"]
    if dry:  # minutes on two CPU cores: a small model and batch
        values += ["model.emb_dim=32", "model.hidden_size=32", "train.batch_size=16", "eval.samples=0",
                   "ami.strength_cap=0.7", "optim.lr=0.02"]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry", action="store_true", help="CPU: a tiny model and a few steps")
    args = parser.parse_args()

    import torch

    from ami_dist import ops
    from ami_dist.config import load_config
    from ami_dist.data.prepare import ensure_prepared
    from ami_dist.distributed import init_distributed
    from ami_dist.distributed.comm import exit_worker
    from ami_dist.distributed.deepspeed_adapter import adapter_params
    from ami_dist.training.build import build_run, make_run_dir, resolve_deepspeed
    from ami_dist.training.checkpoint import latest_tag, resume
    from ami_dist.training.loop import train

    torch.use_deterministic_algorithms(True, warn_only=True)  # so that the resumed run can match exactly
    stop = SCHEDULES["dry" if args.dry else "gpu"][-1]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/nmt_demo.yaml", overrides(args.dry, tmp))
        ops.set_impl(cfg.lns.impl)
        comm = init_distributed(cfg.distributed.timeout_s, cfg.train.threads_per_rank,
                                cfg.distributed.deepspeed_adapter)
        prepared = ensure_prepared(cfg, show=False)
        ds_configs = resolve_deepspeed(cfg, args.preset, comm.world_size)

        whole = recorder()
        run = build_run(cfg, comm, make_run_dir(cfg, comm), whole, ds_configs, args.preset, prepared)
        device = str(run.networks[0].engine.device)
        final = train(run)
        total = run.schedule.total_steps
        memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

        parts = recorder()
        cfg.train.stop_after_steps = stop
        run_dir = make_run_dir(cfg, comm)
        first = build_run(cfg, comm, run_dir, parts, ds_configs, args.preset, prepared)
        stopped = train(first) is None
        tag = latest_tag(run_dir)
        cfg.train.stop_after_steps = 0
        second = build_run(cfg, comm, run_dir, parts, ds_configs, args.preset, prepared)
        resume(second, tag)
        resumed_at = second.step
        train(second)

    mle = SCHEDULES["dry" if args.dry else "gpu"][0]
    nll = [v for s, v in sorted(whole.metrics["fw/mle_nll"].items()) if s <= mle]
    values = [v for series in whole.metrics.values() for v in series.values()]
    worst = 0.0
    compared = 0
    missing = []
    for key, series in whole.metrics.items():
        if key in NOT_COMPARED:
            continue
        for step, value in series.items():
            if step <= stop:
                continue
            other = parts.metrics.get(key, {}).get(step)
            if other is None:
                missing.append(f"{key}@{step}")
                continue
            worst = max(worst, abs(other - value) / max(abs(value), 1e-6))
            compared += 1
    checks = {
        "loss_falls": sum(nll[-10:]) / 10 < 0.9 * sum(nll[:10]) / 10,
        "all_finite": all(math.isfinite(v) for v in values),
        "no_skipped_update": max(whole.metrics["train/skipped_updates"].values()) == 0,
        "ami_ran": "fw/adv_loss" in whole.metrics and "noise/strength" in whole.metrics,
        "checkpoint": stopped and tag == f"step{stop}" and resumed_at == stop,
        "resume_matches": not missing and compared > 0 and worst <= RESUME_TOLERANCE,
    }
    result = {
        "ok": all(checks.values()), "checks": checks, "preset": args.preset, "device": device, "steps": total,
        "stop": stop, "first_nll": sum(nll[:10]) / 10, "last_nll": sum(nll[-10:]) / 10,
        "resume_max_rel_diff": worst, "resume_compared": compared, "resume_missing": missing[:5],
        "valid_bleu": (final or {}).get("valid/fw_bleu"), "max_memory_allocated": memory,
        "seconds": time.perf_counter() - started, **adapter_params(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    exit_worker(0 if result["ok"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at first use)
    main()
