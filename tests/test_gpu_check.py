"""The GPU check (benchmarks/gpu_check.py, `make gpu-check`): its dry run passes on CPU, exercising every step
that needs no CUDA; on a machine without a GPU the real check fails rather than passing vacuously; a failing,
crashing or late step fails the whole check and still leaves the table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)

STEP_NAMES = ["environment", "build", "cuda tests", "lns benchmark", "train zero2", "train zero3",
              "throughput lstm", "throughput transformer"]


@pytest.mark.slow
@pytest.mark.distributed
def test_make_gpu_check_dry_passes_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(["make", "gpu-check", "DRY=1", f"GPU_CHECK_OUT={tmp_path}"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| step", "| ---"))}
    assert list(rows) == STEP_NAMES, rows
    assert rows["build"] == rows["cuda tests"] == gpu_check.SKIP
    assert all(status == gpu_check.DRY_PASS for name, status in rows.items() if name not in ("build", "cuda tests"))
    assert "nothing of DeepSpeed replaced" in proc.stdout
    for stage in (2, 3):  # the recipe ran, stopped, resumed and matched on each ZeRO stage
        result = json.loads((tmp_path / f"train_zero{stage}.json").read_text())
        assert result["ok"] and all(result["checks"].values()), result
        assert result["resume_compared"] > 20 and result["resume_max_rel_diff"] <= 1e-6, result
    collected = (tmp_path / "cuda_tests.log").read_text()
    assert "test_cuda_opcheck" in collected and "test_cuda_backward_and_score_match_cpu_kernel" in collected
    assert json.loads((tmp_path / "throughput_dialog_lstm_cpu_small.json").read_text())["rows"]["ami_adversarial"]
    assert (tmp_path / "summary.md").read_text().startswith("| step |")


def test_without_a_gpu_the_real_check_fails_at_its_first_step(tmp_path: Path) -> None:
    ctx = gpu_check.Context(dry=False, out=tmp_path, env={**subprocess_env(), "PYTHONPATH": str(ROOT)})
    outcome = gpu_check.environment(ctx, 120)
    assert outcome.status == gpu_check.FAIL and "torch.cuda.is_available() is False" in outcome.summary, outcome


def test_a_failing_or_crashing_or_late_step_fails_the_check(tmp_path: Path, monkeypatch, capsys) -> None:
    def crash(ctx, limit_s):
        raise RuntimeError("boom")

    steps = [gpu_check.Step("good", 10, lambda ctx, s: gpu_check.Outcome(gpu_check.PASS, "fine")),
             gpu_check.Step("bad", 10, lambda ctx, s: gpu_check.Outcome(gpu_check.FAIL, "broken")),
             gpu_check.Step("crash", 10, crash)]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "no-wheels")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path)])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    assert "| good | pass |" in out and "| bad | FAIL |" in out and "RuntimeError: boom" in out
    assert "FAILED: bad, crash" in out

    ctx = gpu_check.Context(dry=False, out=tmp_path, deadline=0.0)  # past the deadline: nothing runs
    ((name, outcome, _),) = gpu_check.run_steps(ctx, steps[:1])
    assert name == "good"
    assert outcome.status == gpu_check.FAIL and "deadline" in outcome.summary
