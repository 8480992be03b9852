"""A finished run to break: the fixture's builder, a command runner for it, and a pickle that runs code.

The run (4 MLE steps, checkpoints at steps 2 and 4, and its export as model.pt) is built once per test
session with every path relative to its directory, so that each case can work on its own copy.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config


class Exploit:
    """Unpickling this runs ``touch marker`` through a shell; weights_only=True loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_in(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd`` with the repository importable."""
    return subprocess.run([PYTHON, *args], cwd=cwd, env={**subprocess_env(), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)


def build_finished_run(base: Path) -> Path:
    cfg = tiny_config(base, train={"batch_size": 16, "mle_steps": 4, "log_every": 2, "save_every": 2},
                      model={"emb_dim": 16, "hidden_size": 16})
    cfg["run"]["output_dir"] = "runs"
    cfg["tracking"]["uri"] = "sqlite:///mlflow.db"
    cfg["distributed"] = {"deepspeed_config": str(ROOT / "configs/ds_zero2.json")}
    write_config(base, cfg)
    for args in ([str(ROOT / "ami_dist/train.py"), "--config", "run.yaml", "--run_dir", "run"],
                 ["-m", "ami_dist.export", "run", "--out", "model.pt"]):
        proc = run_in(base, args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return base
