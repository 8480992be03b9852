"""Two real processes (torchrun, gloo) train both networks under ZeRO stages 1, 2 and 3 (and the
Transformer under ZeRO-3).

The loss must fall, and after training the whole parameters (gathered from the shards for stage 3)
must be identical on both ranks; the export is exactly them, and ``--average`` the mean of the checkpoints'.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from ami_dist.export import consolidate, load_exported
from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed


TRANSFORMER = {"family": "transformer", "emb_dim": 32, "hidden_size": 32, "heads": 4, "ffn_size": 64}


@pytest.mark.parametrize(("stage", "family"), [(1, "lstm"), (2, "lstm"), (3, "lstm"), (3, "transformer")])
def test_zero_stage_trains_and_ranks_agree(stage: int, family: str, tmp_path: Path) -> None:
    model = {"emb_dim": 32, "hidden_size": 32} if family == "lstm" else TRANSFORMER
    cfg = tiny_config(tmp_path, train={"batch_size": 32, "mle_steps": 24, "log_every": 4, "save_every": 8}, model=model,
                      optim={"name": "adam", "lr": 0.005}, tracking={"enabled": False})
    config = write_config(tmp_path, cfg)
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29600 + stage + 10 * (family == "transformer")),
         str(ROOT / "tests/distributed/zero_worker.py"), str(config), str(ROOT / f"configs/ds_zero{stage}.json"),
         str(tmp_path)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "metrics_rank0.json").read_text())
    assert info["zero_stage"] == stage and info["world_size"] == 2
    train_logs = [m for _, m in info["metrics"] if "fw/mle_nll" in m]
    assert len(train_logs) == 6
    for net in ("fw", "bw"):
        first, last = train_logs[0][f"{net}/mle_nll"], train_logs[-1][f"{net}/mle_nll"]
        assert last < first - 0.5, f"{net} loss did not fall: {first:.3f} -> {last:.3f}"
    rank0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    for net in ("forward", "backward"):
        assert rank0[net].keys() == rank1[net].keys()
        for name, value in rank0[net].items():
            assert value.numel() > 0, f"{net}.{name} was not gathered"
            assert torch.equal(value, rank1[net][name]), f"{net}.{name} differs between ranks"
    # the two networks are different models (different seeds and directions), not one copied twice
    assert not torch.equal(rank0["forward"]["generator.weight"], rank0["backward"]["generator.weight"])
    # the single-file export consolidates the ZeRO shards into exactly these parameters
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    export = subprocess.run([PYTHON, "-m", "ami_dist.export", str(run_dir), "--out", str(tmp_path / "model.pt")],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    exported = load_exported(tmp_path / "model.pt")
    for net in ("forward", "backward"):
        for name, value in exported.networks[net].named_parameters():
            assert torch.equal(value, rank0[net][name]), f"exported {net}.{name} differs from the trained one"
    # checkpoint averaging: the mean of the checkpoints' consolidated weights, from this stage's shards
    for spec, tags in (("3", ["step8", "step16", "step24"]), ("step8,step24", ["step8", "step24"])):
        out = tmp_path / f"avg{len(tags)}.pt"
        averaged = subprocess.run([PYTHON, "-m", "ami_dist.export", str(run_dir), "--average", spec, "--out", str(out)],
                                  cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert averaged.returncode == 0, averaged.stderr[-3000:]
        exported = load_exported(out)
        assert exported.source["averaged_tags"] == tags
        for net in ("forward", "backward"):
            states = [consolidate(run_dir / "checkpoints" / net, tag) for tag in tags]
            for name, value in exported.networks[net].state_dict().items():
                mean = sum(state[name].double() for state in states) / len(states)
                assert torch.allclose(value.double(), mean, rtol=0, atol=1e-7), f"averaged {net}.{name}"
            assert not torch.equal(states[0]["generator.weight"], states[-1]["generator.weight"])
