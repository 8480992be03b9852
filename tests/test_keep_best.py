"""Keep-best and early stopping on a real run whose validation BLEU is made to rise and fall, and averaging
the best checkpoints it kept (``ami-export --average best:2``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ami_dist.export import consolidate, load_exported
from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

# validation BLEU by step: the best is step 8 (30), then three validations without a new best
BLEU = {2: 10, 4: 20, 6: 15, 8: 30, 10: 25, 12: 24, 14: 23, 16: 40, 18: 41, 20: 39}


def _train(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "PYTHONPATH": str(ROOT),
           "AMI_TEST_BLEU": ",".join(f"{step}:{value}" for step, value in BLEU.items())}
    return subprocess.run([PYTHON, str(ROOT / "tests/training/scripted_validation.py"), *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)


def _tags(run_dir: Path) -> list[str]:
    return sorted((p.name for p in (run_dir / "checkpoints/ranks").iterdir()), key=lambda t: int(t[4:]))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("keep_best")
    cfg = tiny_config(tmp, train={"batch_size": 16, "mle_steps": 20, "log_every": 2, "valid_every": 2,
                                  "keep_checkpoints": 1, "keep_best": 2, "early_stopping": 3},
                      model={"emb_dim": 16, "hidden_size": 16}, eval={"samples": 0})
    cfg["distributed"] = {"deepspeed_config": str(ROOT / "configs/ds_zero2.json")}
    config = write_config(tmp, cfg)
    proc = _train(tmp, "--config", str(config), "--run_dir", "run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "run": tmp / "run", "proc": proc, "uri": cfg["tracking"]["uri"]}


def test_early_stopping_ends_the_run_with_a_checkpoint_and_says_why(stopped: dict) -> None:
    out = stopped["proc"].stdout
    assert ("ami-dist: early stopping after step 14 of 20: valid/fw_bleu has not improved on 30.0000 (step 8) "
            "for 3 validations (train.early_stopping=3); checkpoint step14") in out
    assert "finished 14 steps" in out
    assert (stopped["run"] / "checkpoints/latest").read_text().strip() == "step14"
    client = MlflowClient(tracking_uri=stopped["uri"])
    run = client.get_run((stopped["run"] / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.data.tags["early_stopped_at_step"] == "14"
    assert run.data.tags["best_checkpoint"] == "step8"
    assert run.data.tags["best_checkpoints"] == "step8 (30.0000), step10 (25.0000)"


def test_the_best_checkpoints_are_kept_beside_the_newest(stopped: dict) -> None:
    # every validation that entered the best two was checkpointed (2, 4, 6, 8, 10), and each that fell out again
    # was deleted; keep_checkpoints=1 keeps the newest (14) besides them
    assert _tags(stopped["run"]) == ["step8", "step10", "step14"]
    for network in ("forward", "backward"):
        assert sorted(p.name for p in (stopped["run"] / "checkpoints" / network).iterdir()
                      if p.name.startswith("step")) == ["step10", "step14", "step8"]
    best = json.loads((stopped["run"] / "checkpoints/best.json").read_text())
    assert best["metric"] == "valid/fw_bleu" and best["higher_is_better"]
    assert [(e["tag"], e["value"]) for e in best["best"]] == [("step8", 30.0), ("step10", 25.0)]
    assert best["validations_since_best"] == 3
    assert [h["step"] for h in best["history"]] == [2, 4, 6, 8, 10, 12, 14]


def test_averaging_the_best_two_is_the_mean_of_their_weights(stopped: dict) -> None:
    proc = subprocess.run([PYTHON, "-m", "ami_dist.export", "run", "--average", "best:2", "--out", "avg.pt"],
                          cwd=stopped["tmp"], env={**subprocess_env(), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the mean of step8, step10" in proc.stdout
    exported = load_exported(stopped["tmp"] / "avg.pt")
    assert exported.source["averaged_tags"] == ["step8", "step10"]
    for network in ("forward", "backward"):
        a, b = (consolidate(stopped["run"] / "checkpoints" / network, tag) for tag in ("step8", "step10"))
        for name, value in exported.networks[network].state_dict().items():
            assert torch.allclose(value, (a[name] + b[name]) / 2, rtol=0, atol=1e-7), f"{network}.{name}"
        assert not torch.equal(a["generator.weight"], b["generator.weight"])  # two different checkpoints


def test_a_resumed_run_that_stopped_early_stays_stopped_unless_patience_is_raised(stopped: dict) -> None:
    again = _train(stopped["tmp"], "--resume", "run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ami-dist: stopped early at step 14" in again.stdout and "finished 14 steps" in again.stdout
    assert _tags(stopped["run"])[-1] == "step14"
    more = _train(stopped["tmp"], "--resume", "run", "train.early_stopping=0")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "finished 20 steps" in more.stdout
    best = json.loads((stopped["run"] / "checkpoints/best.json").read_text())
    assert [(e["tag"], e["value"]) for e in best["best"]] == [("step18", 41.0), ("step16", 40.0)]
    assert _tags(stopped["run"]) == ["step16", "step18", "step20"]
