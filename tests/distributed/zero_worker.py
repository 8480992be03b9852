"""Worker for test_zero_stages: trains both networks for a few steps under a ZeRO preset, then dumps
the losses it saw and the whole (gathered) parameters of each network, one file per rank.

Run by the test under torchrun: ``torchrun --nproc_per_node 2 zero_worker.py CONFIG PRESET OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from worker_setup import build_test_run  # this script's own directory is on sys.path

from ami_dist.distributed import full_parameters
from ami_dist.distributed.comm import exit_worker
from ami_dist.training.loop import train


class RecordingTracker:
    """Keeps every logged metric in memory (the test reads them back from a JSON file)."""

    run_id = None

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params: dict) -> None:
        pass

    def log_artifact(self, path: object, artifact_path: object = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_inputs(self, datasets: list) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def main() -> None:
    config, preset, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    tracker = RecordingTracker()
    run = build_test_run(config, preset, tracker)
    comm = run.comm
    train(run)
    params = {net.name: full_parameters(net.engine) for net in run.networks}
    torch.save(params, out / f"params_rank{comm.rank}.pt")
    (out / f"metrics_rank{comm.rank}.json").write_text(json.dumps({
        "metrics": tracker.metrics,
        "zero_stage": run.networks[0].engine.zero_optimization_stage(),
        "world_size": comm.world_size,
    }))


if __name__ == "__main__":
    main()
    exit_worker()  # see its docstring: no abort at teardown after the work is done
