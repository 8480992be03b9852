"""Worker for test_ami_phases: runs a short AMI schedule step by step and records, after every step,
which engines' (gathered) parameters changed; dumps the records and the final parameters per rank.

Run by the test under torchrun: ``torchrun --nproc_per_node 2 ami_worker.py CONFIG PRESET OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from worker_setup import build_test_run  # this script's own directory is on sys.path

from ami_dist.distributed import full_parameters
from ami_dist.distributed.comm import exit_worker
from ami_dist.tracking import NullTracker
from ami_dist.training.loop import run_step
from ami_dist.training.meter import Meter
from ami_dist.training.phases import METRICS


def main() -> None:
    config, preset, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    run = build_test_run(config, preset, NullTracker())
    comm = run.comm
    engines = {"forward": run.network("forward").engine, "backward": run.network("backward").engine,
               "noise": run.noise}

    def snapshot() -> dict[str, dict[str, torch.Tensor]]:
        return {name: full_parameters(engine) for name, engine in engines.items()}

    # Which engines receive any gradient during a step: a leak into a frozen engine shows up here
    # even when that engine does not step in the same phase.
    got_gradient: set[str] = set()
    for name, engine in engines.items():
        for p in engine.module.parameters():
            p.register_hook(lambda grad, name=name: got_gradient.add(name))
    meter = Meter(METRICS)
    batches = iter(run.sampler)
    records = []
    before = snapshot()
    while run.step < run.schedule.total_steps:
        position = run.schedule.position(run.step)
        got_gradient.clear()
        run_step(run, position, [next(batches)], meter)
        run.step += 1
        after = snapshot()
        changed = sorted(name for name in engines
                         if any(not torch.equal(before[name][p], after[name][p]) for p in before[name]))
        records.append({"phase": position.phase.name, "step_in_phase": position.step_in_phase, "changed": changed,
                        "got_gradient": sorted(got_gradient)})
        before = after
    counts = dict(zip(meter.names, comm.sum([meter.counts[n] for n in meter.names]), strict=True))
    torch.save(before, out / f"params_rank{comm.rank}.pt")
    (out / f"records_rank{comm.rank}.json").write_text(json.dumps({"records": records, "counts": counts}))


if __name__ == "__main__":
    main()
    exit_worker()  # see its docstring: no abort at teardown after the work is done
