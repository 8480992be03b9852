"""A run stopped in the middle of an AMI phase and resumed with --resume continues exactly: the same
losses (to 1e-6) as an uninterrupted run, logged into the same MLflow run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

# 4 MLE steps, 2 of noise pretraining, then one cycle of 2 / 3 / 2: the first invocation stops in the middle
# of noise pretraining, the second in the middle of the forward phase, the third runs to the end.
STOPS = (5, 9)
TOTAL = 13


def _train(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "ami_dist/train.py", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _histories(uri: str, experiment: str) -> tuple[dict[str, dict[int, float]], object]:
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics if not key.startswith("system/")}, run  # machine use: sampled, not stepped


@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["ds_zero2.json", "ds_zero3.json"])  # ZeRO-3: built under zero.Init
def test_resumed_run_matches_the_uninterrupted_one(tmp_path: Path, preset: str) -> None:
    cfg = tiny_config(
        tmp_path,
        distributed={"deepspeed_config": str(ROOT / "configs" / preset)},
        train={"batch_size": 16, "mle_steps": 4, "log_every": 1},
        model={"emb_dim": 16, "hidden_size": 16, "dropout": 0.2},  # dropout: the RNG state must resume too
        optim={"name": "adam", "lr": 0.003},
        lns={"k": 3},
        ami={"enabled": True, "noise_pretrain_steps": 2, "cycles": 1, "noise_steps": 2, "forward_steps": 3,
             "backward_steps": 2, "adv_every": 1, "adv_lr": 0.001},
    )
    whole = dict(cfg, tracking={**cfg["tracking"], "experiment": "whole"})
    _train(["--config", str(write_config(tmp_path, whole, "whole.yaml"))])

    parts = dict(cfg, tracking={**cfg["tracking"], "experiment": "parts"})
    first = _train(["--config", str(write_config(tmp_path, parts, "parts.yaml")), f"train.stop_after_steps={STOPS[0]}"])
    assert f"stopped after step {STOPS[0]} of {TOTAL}" in first.stdout
    run_dir = sorted((tmp_path / "runs").iterdir())[-1]
    # stop_after_steps counts per invocation
    second = _train(["--resume", str(run_dir), f"train.stop_after_steps={STOPS[1] - STOPS[0]}"])
    assert f"from checkpoint step{STOPS[0]} (step {STOPS[0]})" in second.stdout
    assert f"stopped after step {STOPS[1]} of {TOTAL}" in second.stdout
    third = _train(["--resume", str(run_dir), "train.stop_after_steps=0"])
    assert f"from checkpoint step{STOPS[1]} (step {STOPS[1]})" in third.stdout

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
            compared += step > STOPS[0]
    # after the first stop: the rest of noise pretraining, the adversarial forward and backward steps (at the
    # stage's learning rate) and the final evaluation with the fixed critic
    after = {k for k, s in reference.items() if max(s) > STOPS[0]}
    assert {"noise/strength", "fw/adv_loss", "bw/demote_weight", "valid/fw_bleu", "valid/mi_logq_fixed"} <= after
    assert reference["fw/lr"][TOTAL] == pytest.approx(0.001)
    assert reference["schedule/stage"][6] == 1 and reference["schedule/stage"][7] == 2
    assert compared > 20


@pytest.mark.distributed
def test_ami_can_start_from_the_checkpoints_of_an_mle_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, train={"batch_size": 16, "mle_steps": 6},
                      optim={"name": "adam", "lr": 0.003}, tracking={"experiment": "mle"})
    _train(["--config", str(write_config(tmp_path, cfg, "mle.yaml"))])
    mle_dir = sorted((tmp_path / "runs").iterdir())[-1]
    start = dict(cfg, train={**cfg["train"], "mle_steps": 0, "eval_before_training": True},
                 vocab={**cfg["vocab"], "model": str(mle_dir / "spm.model")})
    ami = dict(start, ami={"enabled": True, "noise_pretrain_steps": 1, "cycles": 1, "noise_steps": 1,
                           "forward_steps": 1, "backward_steps": 1, "adv_every": 1,
                           "init_forward": str(mle_dir / "checkpoints/forward"),
                           "init_backward": str(mle_dir / "checkpoints/backward")},
               tracking={**cfg["tracking"], "experiment": "ami"})
    _train(["--config", str(write_config(tmp_path, ami, "ami.yaml"))])
    mle, _ = _histories(cfg["tracking"]["uri"], "mle")
    started, _ = _histories(cfg["tracking"]["uri"], "ami")
    for key in ("valid/fw_ppl", "valid/bw_ppl"):  # the AMI run starts exactly where the MLE run ended
        assert started[key][0] == pytest.approx(mle[key][6], rel=1e-6)
    # its fixed critic is the backward network as AMI started: the same score then, another one once it trained
    assert started["valid/mi_logq_fixed"][0] == pytest.approx(started["valid/mi_logq"][0], rel=1e-6)
    assert started["valid/mi_logq_fixed"][4] != pytest.approx(started["valid/mi_logq"][4], rel=1e-6)

    # an MLE continuation scored by the MLE run's backward network, named as eval.fixed_critic
    more = dict(start, train={**start["train"], "mle_steps": 2},
                eval={**cfg["eval"], "fixed_critic": str(mle_dir / "checkpoints/backward")},
                tracking={**cfg["tracking"], "experiment": "more"})
    more["ami"] = {"init_forward": str(mle_dir / "checkpoints/forward")}  # the backward network starts afresh
    _train(["--config", str(write_config(tmp_path, more, "more.yaml"))])
    continued, _ = _histories(cfg["tracking"]["uri"], "more")
    assert continued["valid/mi_logq_fixed"][0] == pytest.approx(mle["valid/mi_logq"][6], rel=1e-6)
    assert continued["valid/mi_logq"][0] != pytest.approx(mle["valid/mi_logq"][6], rel=1e-3)
