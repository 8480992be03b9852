"""NaN losses and gradients, injected on one rank of two through the config's fault section: the update is
skipped on both ranks (the weights do not move), counted and logged, and too many bad steps in a row stop
the run with exit code 1, one clear line, a checkpoint of the last good weights and a FAILED MLflow run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed

LAUNCHER = str(ROOT / ".venv/bin/deepspeed") if (ROOT / ".venv/bin/deepspeed").exists() else "deepspeed"


def _launch(tmp: Path, name: str, port: int, **sections: dict) -> tuple[subprocess.CompletedProcess, dict]:
    cfg = tiny_config(
        tmp, model={"emb_dim": 16, "hidden_size": 16},
        train={"batch_size": 16, "log_every": 1, "save_every": 1, "keep_checkpoints": 0, **sections.pop("train")},
        lns={"k": 2}, tracking={"experiment": name}, **sections,
    )
    command = [LAUNCHER, "--num_gpus", "2", "--master_port", str(port), "ami_dist/train.py", "--deepspeed_config",
               "configs/ds_zero2.json", "--config", str(write_config(tmp, cfg, f"{name}.yaml")),
               "--run_dir", str(tmp / name)]
    proc = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    return proc, cfg


def _weights(run_dir: Path, net: str, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / net / f"step{step}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _run(cfg: dict, name: str):
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return client, run


def test_a_bad_step_on_one_rank_is_skipped_on_both(tmp_path: Path) -> None:
    # steps 1-4 MLE, 5-6 noise, 7-8 forward (8 adversarial), 9-10 backward
    proc, cfg = _launch(tmp_path, "skips", 29741, train={"mle_steps": 4},
                        # a cap above ‖δ‖: the strength term moves the noise network even when the K samples
                        # of a barely trained network are all alike (and every advantage is 0)
                        ami={"enabled": True, "noise_pretrain_steps": 0, "cycles": 1, "noise_steps": 2,
                             "forward_steps": 2, "backward_steps": 2, "strength_cap": 100.0},
                        fault={"nan_loss_steps": [3, 8], "nan_grad_steps": [5], "rank": 1})
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for step, what in ((3, "forward MLE, backward MLE"), (5, "noise"), (8, "forward MLE, forward adversarial")):
        assert f"step {step}: non-finite loss or gradient in {what}; update skipped on every rank" in output
    run_dir = tmp_path / "skips"
    for net in ("forward", "backward"):  # step 3 moved nothing; the good steps around it did
        assert _same(_weights(run_dir, net, 2), _weights(run_dir, net, 3))
        assert not _same(_weights(run_dir, net, 3), _weights(run_dir, net, 4))
    assert _same(_weights(run_dir, "noise", 4), _weights(run_dir, "noise", 5))
    assert not _same(_weights(run_dir, "noise", 5), _weights(run_dir, "noise", 6))
    assert _same(_weights(run_dir, "forward", 7), _weights(run_dir, "forward", 8))
    client, run = _run(cfg, "skips")
    assert run.info.status == "FINISHED"
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/skipped_updates")}
    assert (skipped[2], skipped[3], skipped[5], skipped[8], skipped[10]) == (0, 2, 3, 5, 5)
    nll = client.get_metric_history(run.info.run_id, "fw/mle_nll")
    # the curves hold the healthy rank's losses of the bad steps, and no NaN
    assert {m.step for m in nll} == {1, 2, 3, 4, 7, 8}
    assert all(m.value == m.value for m in nll)


def test_too_many_bad_steps_in_a_row_stop_the_run_with_the_last_good_weights(tmp_path: Path) -> None:
    proc, cfg = _launch(tmp_path, "stops", 29745, train={"mle_steps": 10, "max_bad_steps": 3},
                        fault={"nan_grad_steps": [3, 4, 5], "rank": 0})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = {line for line in proc.stderr.splitlines() if line.startswith("ami-dist: error:")}
    assert errors == {"ami-dist: error: 3 steps in a row (the last, step 5, in forward MLE, backward MLE) had a "
                      "non-finite loss or gradient, the limit set by train.max_bad_steps; stopped with checkpoint "
                      "step5, which holds the weights of step 2 (skipped updates change nothing). Lower the "
                      "learning rate or clip gradients (optim.max_grad_norm), then continue with --resume"}, proc.stderr
    run_dir = tmp_path / "stops"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step5"
    for net in ("forward", "backward"):
        assert _same(_weights(run_dir, net, 2), _weights(run_dir, net, 5))
    _, run = _run(cfg, "stops")
    assert run.info.status == "FAILED"
    assert "train.max_bad_steps" in run.data.tags["failure_reason"]
