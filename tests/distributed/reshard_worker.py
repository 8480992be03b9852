"""Worker for test_reshard: a run of CONFIG under PRESET, on however many ranks torchrun gives it, loads
checkpoint TAG of SOURCE (a run directory written on another number of ranks, or another ZeRO stage) and at
once saves it again into OUT (a run directory), untouched by any step. TAG ``-`` loads nothing: the run's
networks are as built (from ``ami.init_forward`` and ``ami.init_backward`` where CONFIG names them).

Run by the test: ``torchrun --nproc_per_node N reshard_worker.py CONFIG PRESET SOURCE TAG OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from worker_setup import build_test_run  # this script's own directory is on sys.path

from ami_dist.distributed.comm import exit_worker
from ami_dist.tracking import NullTracker
from ami_dist.training.checkpoint import resume, save_checkpoint


def main() -> None:
    config, preset, source, tag, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
    run = build_test_run(config, preset, NullTracker())
    if tag != "-":
        run.run_dir = source
        resume(run, tag)
    run.run_dir = out
    save_checkpoint(run)
    exit_worker()


if __name__ == "__main__":
    main()
