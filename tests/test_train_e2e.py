"""The real entry point under the deepspeed launcher: 2 ranks, ZeRO-2, MLflow store, checkpoints, BLEU.

One short training run (module fixture) is checked from several sides: validation perplexity falls by a
clear margin for both networks (the learning test), the MLflow store holds the run with its params,
metric histories and artifacts, every rank wrote its checkpoint shards, and the summary reports BLEU.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed

STEPS = 150


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tiny_config(
        tmp,
        data={"valid_limit": 200},
        model={"emb_dim": 64, "hidden_size": 64, "bidirectional": True},
        optim={"name": "adam", "lr": 0.005},
        train={"batch_size": 32, "mle_steps": STEPS, "log_every": 10, "save_every": 75,
               "eval_before_training": True},
        tracking={"experiment": "e2e"},
    )
    config = write_config(tmp, cfg)
    deepspeed = Path(ROOT / ".venv/bin/deepspeed")
    launcher = str(deepspeed) if deepspeed.exists() else "deepspeed"
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", "29641", "ami_dist/train.py",
         "--deepspeed_config", "configs/ds_zero2.json", "--config", str(config)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    uri = cfg["tracking"]["uri"]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return {"stdout": proc.stdout, "client": client, "run": runs[0], "tmp": tmp}


def _history(trained: dict, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in trained["client"].get_metric_history(trained["run"].info.run_id, key)]


def test_validation_perplexity_falls_for_both_networks(trained: dict) -> None:
    for net in ("fw", "bw"):
        history = _history(trained, f"valid/{net}_ppl")
        assert [step for step, _ in history] == [0, STEPS]
        before, after = history[0][1], history[1][1]
        # 150 Adam steps of 32 pairs take an untrained network from about the vocabulary size (1000) to
        # under a fifth of its starting perplexity (seen: forward 996 -> 138, backward 1014 -> 102).
        assert before > 500
        assert after < before / 5, f"{net}: valid perplexity {before:.1f} -> {after:.1f}"


def test_mlflow_run_has_params_metrics_and_artifacts(trained: dict) -> None:
    run, client = trained["run"], trained["client"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.hidden_size"] == "64"
    assert params["train.mle_steps"] == str(STEPS)
    assert params["zero_stage"] == "2" and params["world_size"] == "2" and params["micro_batch_size"] == "16"
    assert run.data.tags["task"] == "nmt" and run.data.tags["model_family"] == "lstm"
    assert run.data.tags["bleu_signature"].startswith("nrefs:1|")
    for key in ("fw/mle_nll", "bw/mle_nll", "fw/lr", "train/tgt_tokens_per_s"):
        steps = [step for step, _ in _history(trained, key)]
        assert steps == list(range(10, STEPS + 1, 10)), key
    nll = [v for _, v in _history(trained, "fw/mle_nll")]
    assert nll[-1] < nll[0]
    for key in ("valid/fw_bleu", "valid/bw_bleu", "valid/fw_chrf"):
        assert [step for step, _ in _history(trained, key)] == [0, STEPS]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/config.yaml", "config/deepspeed_forward.json", "config/deepspeed_backward.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "vocab")] == ["vocab/spm.model"]
    samples = {a.path for a in client.list_artifacts(run.info.run_id, f"valid/step{STEPS}")}
    assert f"valid/step{STEPS}/forward.step{STEPS}.hyp" in samples


def test_every_rank_wrote_checkpoint_shards(trained: dict) -> None:
    run_dir = Path(trained["run"].data.tags["run_dir"])
    for net in ("forward", "backward"):
        root = run_dir / "checkpoints" / net
        assert (root / "latest").read_text().strip() == f"step{STEPS}"
        for tag in ("step75", f"step{STEPS}"):
            shards = sorted(p.name for p in (root / tag).glob("*optim_states.pt"))
            assert len(shards) == 2, shards  # one ZeRO optimizer shard per rank
            assert (root / tag / "mp_rank_00_model_states.pt").exists()


def test_summary_reports_bleu_and_the_run(trained: dict) -> None:
    out = trained["stdout"]
    assert re.search(r"forward .*valid BLEU \d+\.\d\d", out)
    assert re.search(r"backward .*valid BLEU \d+\.\d\d", out)
    assert f"MLflow run id: {trained['run'].info.run_id}" in out
    assert "mlflow ui --backend-store-uri" in out
