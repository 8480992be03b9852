"""Worker for test_grad_accum_ami: runs an AMI schedule with ``train.grad_accum`` > 1 through the training
loop's ``run_step`` and records every engine update call with whether it ended an accumulation window.

Run under torchrun: ``torchrun --nproc_per_node N accum_worker.py CONFIG PRESET OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from worker_setup import build_test_run  # this script's own directory is on sys.path

from ami_dist.distributed.comm import exit_worker
from ami_dist.tracking import NullTracker
from ami_dist.training.loop import run_step
from ami_dist.training.meter import Meter
from ami_dist.training.phases import METRICS


def main() -> None:
    config, preset, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    run = build_test_run(config, preset, NullTracker())
    names = {id(run.network("forward").engine): "forward", id(run.network("backward").engine): "backward",
             id(run.noise): "noise"}
    calls = []
    original = run.guard.update

    def recording(engine, loss, name):
        calls.append({"engine": names[id(engine)], "update": name, "step": run.step,
                      "boundary": bool(engine.is_gradient_accumulation_boundary())})
        return original(engine, loss, name)

    run.guard.update = recording
    meter = Meter(METRICS)
    batches = iter(run.sampler)
    while run.step < run.schedule.total_steps:
        position = run.schedule.position(run.step)
        run.guard.begin_step(run.step + 1)
        run_step(run, position, [next(batches) for _ in range(run.cfg.train.grad_accum)], meter)
        run.guard.end_step()
        run.step += 1
    steps = {name: int(engine.global_steps) for name, engine in
             (("forward", run.network("forward").engine), ("backward", run.network("backward").engine),
              ("noise", run.noise))}
    (out / f"calls_rank{run.comm.rank}.json").write_text(json.dumps({"calls": calls, "global_steps": steps}))


if __name__ == "__main__":
    main()
    exit_worker()  # see its docstring: no abort at teardown after the work is done
