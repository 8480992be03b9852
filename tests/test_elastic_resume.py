"""A run resumed on another number of ranks (a requeued job that came back on fewer or more nodes) goes on
with the same global batches and the same weights and optimizer state, resharded: 2 ranks, then 1, then 3.

Latent noise is drawn per rank (each rank's seed folds in its rank), so a step that draws it cannot match an
uninterrupted run's once the world size changed; the losses that do not depend on it must match: the MLE
steps after the first resume, and the forward network's first MLE loss of its AMI phase, computed from the
weights it had when MLE ended (two reshards earlier) on the batch the global data position gives at step 9.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ami_dist.distributed.env import _free_port
from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

TOTAL = 13  # 4 MLE steps, 2 of noise pretraining, then one cycle of 2 noise / 3 forward / 2 backward steps


def _train(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    launch = ([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(_free_port())] if ranks > 1 else [PYTHON])
    proc = subprocess.run([*launch, "ami_dist/train.py", *args, "train.threads_per_rank=1"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _histories(uri: str, experiment: str) -> tuple[dict[str, list[tuple[int, float]]], object]:
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics if not key.startswith("system/")}, run


@pytest.mark.distributed
def test_a_run_continues_on_one_rank_then_on_three(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        distributed={"deepspeed_config": str(ROOT / "configs" / "ds_zero2.json")},
        train={"batch_size": 12, "mle_steps": 4, "log_every": 1},  # 12 = 2 x 6 = 1 x 12 = 3 x 4
        model={"emb_dim": 16, "hidden_size": 16},
        optim={"name": "adam", "lr": 0.003},  # moments to reshard
        lns={"k": 3},
        ami={"enabled": True, "noise_pretrain_steps": 2, "cycles": 1, "noise_steps": 2, "forward_steps": 3,
             "backward_steps": 2, "adv_every": 1, "adv_lr": 0.001},
    )
    uri = cfg["tracking"]["uri"]
    whole = dict(cfg, tracking={**cfg["tracking"], "experiment": "whole"})
    _train(2, ["--config", str(write_config(tmp_path, whole, "whole.yaml"))])

    parts = dict(cfg, tracking={**cfg["tracking"], "experiment": "parts"})
    run_dir = tmp_path / "parts"
    _train(2, ["--config", str(write_config(tmp_path, parts, "parts.yaml")), "--run_dir", str(run_dir),
               "train.stop_after_steps=2"])
    second = _train(1, ["--run_dir", str(run_dir), "train.stop_after_steps=3"])  # mid noise pretraining
    assert "resharded checkpoint step2 of 2 ranks onto 1 (forward, backward, noise)" in second.stdout
    assert "stopped after step 5 of 13" in second.stdout
    third = _train(3, ["--run_dir", str(run_dir), "train.stop_after_steps=0"])  # to the end
    assert "resharded checkpoint step5 of 1 ranks onto 3 (forward, backward, noise)" in third.stdout

    reference, _ = _histories(uri, "whole")
    resumed, run = _histories(uri, "parts")
    assert run.info.status == "FINISHED"
    assert resumed.keys() == reference.keys()
    for key, history in reference.items():  # the MLflow run continued: every step logged once
        assert [s for s, _ in resumed[key]] == [s for s, _ in history], key
    for key in ("fw/mle_nll", "bw/mle_nll"):  # steps 3 and 4 on 1 rank, after the first reshard: the loss of
        # step 4 is that of the weights step 3's update made with the resharded Adam moments
        assert [v for s, v in resumed[key] if s <= 4] == pytest.approx([v for s, v in reference[key] if s <= 4],
                                                                     rel=1e-5), key
    # noise pretraining's first step on 1 rank: the noise network as initialised, on the encodings of step 5's
    # batch, by a forward network whose float sums ran in another order for two Adam steps (1e-4 apart seen;
    # resharded without the Adam moments, 1e-2)
    assert dict(resumed["noise/memory_norm"])[5] == pytest.approx(dict(reference["noise/memory_norm"])[5], rel=1e-3)
    # the forward network's weights from step 4, through 1 and then 3 ranks, on step 9's batch
    assert dict(resumed["fw/mle_nll"])[9] == pytest.approx(dict(reference["fw/mle_nll"])[9], rel=1e-5)
    assert dict(resumed["noise/loss"])[7] != dict(reference["noise/loss"])[7]  # noise drawn per rank differs


@pytest.mark.distributed
def test_a_token_batched_run_continues_on_no_more_ranks_than_it_started_on(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, train={"batch_size": 12, "batch_tokens": 300, "mle_steps": 4},
                      model={"emb_dim": 16, "hidden_size": 16})
    run_dir = tmp_path / "run"
    _train(1, ["--config", str(write_config(tmp_path, cfg)), "--run_dir", str(run_dir), "train.stop_after_steps=2"])
    launch = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    proc = subprocess.run([*launch, "ami_dist/train.py", "--run_dir", str(run_dir), "train.threads_per_rank=1"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert (f"ami-dist: error: {run_dir}: batching by tokens (train.batch_tokens = 300), this run's steps are laid "
            "out for the 1 ranks it started on") in proc.stderr
    assert "it can continue on at most 1 ranks, not 2" in proc.stderr
    assert "/ami_dist/" not in "".join(line for line in proc.stderr.splitlines() if line.strip().startswith("File "))
