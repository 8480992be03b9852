"""A run stopped in the middle of an AMI phase and resumed with --resume continues exactly: the same
losses (to 1e-6) as an uninterrupted run, logged into the same MLflow run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

STOP = 7  # after 4 MLE steps and a noise phase of 2, step 7 is the second step of the forward phase


def _train(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "ami_dist/train.py", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _histories(uri: str, experiment: str) -> tuple[dict[str, dict[int, float]], object]:
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics}, run


@pytest.mark.distributed
def test_resumed_run_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        train={"batch_size": 16, "mle_steps": 4, "log_every": 1},
        model={"emb_dim": 16, "hidden_size": 16, "dropout": 0.2},  # dropout: the RNG state must resume too
        optim={"name": "adam", "lr": 0.003},
        lns={"k": 3},
        ami={"enabled": True, "cycles": 1, "noise_steps": 2, "forward_steps": 3, "backward_steps": 2,
             "adv_every": 1},
    )
    whole = dict(cfg, tracking={**cfg["tracking"], "experiment": "whole"})
    _train(["--config", str(write_config(tmp_path, whole, "whole.yaml"))])

    parts = dict(cfg, tracking={**cfg["tracking"], "experiment": "parts"})
    first = _train(["--config", str(write_config(tmp_path, parts, "parts.yaml")), f"train.stop_after_steps={STOP}"])
    assert f"stopped after step {STOP} of 11" in first.stdout
    run_dir = sorted((tmp_path / "runs").iterdir())[-1]
    second = _train(["--resume", str(run_dir)])  # stop_after_steps counts per invocation: runs to the end
    assert f"from checkpoint step{STOP} (step {STOP})" in second.stdout

    reference, _ = _histories(cfg["tracking"]["uri"], "whole")
    resumed, run = _histories(cfg["tracking"]["uri"], "parts")
    assert run.info.status == "FINISHED"
    assert reference.keys() == resumed.keys()
    compared = 0
    for key, steps in reference.items():
        if key == "train/tgt_tokens_per_s":
            continue
        assert steps.keys() == resumed[key].keys(), key
        for step, value in steps.items():
            assert resumed[key][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)
            compared += step > STOP
    # the steps after the stop include adversarial forward and backward steps and the final evaluation
    assert {"fw/adv_loss", "bw/demote_weight", "valid/fw_bleu"} <= {k for k, s in reference.items() if max(s) > STOP}
    assert compared > 20


@pytest.mark.distributed
def test_ami_can_start_from_the_checkpoints_of_an_mle_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, train={"batch_size": 16, "mle_steps": 6},
                      optim={"name": "adam", "lr": 0.003}, tracking={"experiment": "mle"})
    _train(["--config", str(write_config(tmp_path, cfg, "mle.yaml"))])
    mle_dir = sorted((tmp_path / "runs").iterdir())[-1]
    ami = dict(cfg, train={**cfg["train"], "mle_steps": 0, "eval_before_training": True},
               vocab={**cfg["vocab"], "model": str(mle_dir / "spm.model")},
               ami={"enabled": True, "cycles": 1, "noise_steps": 1, "forward_steps": 1, "backward_steps": 1,
                    "init_forward": str(mle_dir / "checkpoints/forward"),
                    "init_backward": str(mle_dir / "checkpoints/backward")},
               tracking={**cfg["tracking"], "experiment": "ami"})
    _train(["--config", str(write_config(tmp_path, ami, "ami.yaml"))])
    mle, _ = _histories(cfg["tracking"]["uri"], "mle")
    started, _ = _histories(cfg["tracking"]["uri"], "ami")
    for key in ("valid/fw_ppl", "valid/bw_ppl"):  # the AMI run starts exactly where the MLE run ended
        assert started[key][0] == pytest.approx(mle[key][6], rel=1e-6)
