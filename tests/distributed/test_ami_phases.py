"""Two real processes run full AMI cycles under ZeRO-2 and ZeRO-3: every step changes the parameters of
exactly the engine(s) its phase trains and no gradient reaches any other, adversarial steps run, and
both ranks end identical."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed

TRAINED = {"MLE": ["backward", "forward"], "NOISE": ["noise"], "FORWARD": ["forward"], "BACKWARD": ["backward"]}


@pytest.mark.parametrize("stage", [2, 3])
def test_each_phase_updates_only_its_engine(stage: int, tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        train={"batch_size": 16, "mle_steps": 2},
        model={"emb_dim": 16, "hidden_size": 16, "dropout": 0.1},
        optim={"name": "adam", "lr": 0.003},
        lns={"k": 3},
        ami={"enabled": True, "noise_pretrain_steps": 2, "cycles": 2, "noise_steps": 2, "forward_steps": 2,
             "backward_steps": 2, "adv_every": 1},
        tracking={"enabled": False},
    )
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29620 + stage),
         str(ROOT / "tests/distributed/ami_worker.py"), str(write_config(tmp_path, cfg)),
         str(ROOT / f"configs/ds_zero{stage}.json"), str(tmp_path)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "records_rank0.json").read_text())
    records = result["records"]
    # MLE pretraining, noise pretraining, then the cycles
    assert [r["phase"] for r in records] == ["MLE"] * 2 + ["NOISE"] * 2 + (["NOISE"] * 2 + ["FORWARD"] * 2
                                                                           + ["BACKWARD"] * 2) * 2
    for r in records:
        assert r["changed"] == TRAINED[r["phase"]], r
        assert r["got_gradient"] == TRAINED[r["phase"]], r  # no gradient leaks into a frozen engine
    counts = result["counts"]  # observations summed over both ranks
    assert counts["fw/adv_loss"] == 2 * 4  # every forward-phase step was also adversarial, on both ranks
    assert counts["bw/demote_weight"] > 0 and counts["noise/strength"] > 0
    rank0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    for net, params in rank0.items():
        for name, value in params.items():
            assert value.numel() > 0
            assert torch.equal(value, rank1[net][name]), f"{net}.{name} differs between ranks"
