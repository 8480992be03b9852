"""Resharding a checkpoint moves every tensor exactly: a 2-rank checkpoint taken in the middle of noise
pretraining (forward, backward and noise engines, each with optimizer state) is loaded on 1 rank and saved,
that one loaded on 3 ranks and saved; all three hold the same master weights, optimizer tensors and scalars,
hyperparameters, learning-rate schedules, step counters and data position, bit for bit, for ZeRO-1, -2 and
-3, Adam and SGD with momentum, and from ZeRO-2 to ZeRO-3. The master weights also equal what DeepSpeed's
own consolidation (``zero_to_fp32``) reads from the same files, and a run starting from another run's
networks (``ami.init_forward``) on other ranks and under another stage starts from exactly their weights."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ami_dist.distributed.env import _free_port
from ami_dist.distributed.reshard import FP32, ZeroCheckpoint
from ami_dist.distributed.safe_load import weights_only_loads
from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

WORKER = Path(__file__).with_name("reshard_worker.py")
NETWORKS = ("forward", "backward", "noise")


def _launch(ranks: int, command: list[str]) -> None:
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                           str(_free_port()), *command], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _same(a: ZeroCheckpoint, b: ZeroCheckpoint) -> int:
    """Assert that two checkpoints of one network hold the same state; returns the tensors compared."""
    assert a.names() == b.names()
    compared = 0
    for name in a.names():
        assert a.state_keys(name) == b.state_keys(name), name
        for key in [FP32, *a.state_keys(name)]:
            assert torch.equal(a.tensor(name, key), b.tensor(name, key)), (name, key)
            compared += 1
    assert a.scalars().keys() == b.scalars().keys()
    for key, value in a.scalars().items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.scalars()[key])), key
    assert a.param_groups() == b.param_groups()
    for key in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps", "step", "schedule", "selection"):
        assert a.model_states.get(key) == b.model_states.get(key), key
    for key in ("epoch", "position"):
        assert a.model_states["sampler"][key] == b.model_states["sampler"][key], key
    return compared


def _consolidated(directory: Path) -> dict[str, torch.Tensor]:
    """The master weights as DeepSpeed's zero_to_fp32 reads them (with weights_only loading)."""
    from deepspeed.utils import zero_to_fp32

    with weights_only_loads(zero_to_fp32):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)


@pytest.mark.distributed
@pytest.mark.parametrize(("saved", "loaded", "optim"), [
    ("ds_zero1.json", "ds_zero1.json", {"name": "adam", "lr": 0.003}),
    ("ds_zero2.json", "ds_zero2.json", {"name": "sgd", "lr": 0.1, "momentum": 0.9}),
    ("ds_zero3.json", "ds_zero3.json", {"name": "adam", "lr": 0.003}),
    ("ds_zero2.json", "ds_zero3.json", {"name": "adam", "lr": 0.003}),
], ids=["zero1-adam", "zero2-sgd-momentum", "zero3-adam", "zero2-to-zero3"])
def test_resharding_moves_every_tensor_exactly(tmp_path: Path, saved: str, loaded: str, optim: dict) -> None:
    cfg = tiny_config(tmp_path, distributed={"deepspeed_config": str(ROOT / "configs" / saved)},
                      train={"batch_size": 12, "mle_steps": 4, "threads_per_rank": 1},
                      model={"emb_dim": 16, "hidden_size": 16}, optim=optim, lns={"k": 3},
                      ami={"enabled": True, "noise_pretrain_steps": 2, "cycles": 1, "noise_steps": 1,
                           "forward_steps": 1, "backward_steps": 1, "adv_every": 1})
    config = write_config(tmp_path, cfg)
    source = tmp_path / "source"
    _launch(2, ["ami_dist/train.py", "--config", str(config), "--run_dir", str(source),
                "train.stop_after_steps=5"])
    ones, threes = tmp_path / "on1", tmp_path / "on3"
    preset = str(ROOT / "configs" / loaded)
    _launch(1, [str(WORKER), str(config), preset, str(source), "step5", str(ones)])
    _launch(3, [str(WORKER), str(config), preset, str(ones), "step5", str(threes)])
    compared = 0
    for network in NETWORKS:
        checkpoints = [ZeroCheckpoint(d / "checkpoints" / network / "step5") for d in (source, ones, threes)]
        assert [c.world for c in checkpoints] == [2, 1, 3]
        assert [c.stage for c in checkpoints] == [int(saved[7]), int(loaded[7]), int(loaded[7])]
        if network == "forward":  # the noise network has its own optimizer (ami.noise_optim)
            assert checkpoints[0].state_keys(checkpoints[0].names()[0]) == (
                ["exp_avg", "exp_avg_sq"] if optim["name"] == "adam" else ["momentum_buffer"])
        compared += _same(checkpoints[0], checkpoints[1]) + _same(checkpoints[0], checkpoints[2])
        for checkpoint in (checkpoints[0], checkpoints[2]):
            consolidated = _consolidated(checkpoint.directory)
            assert sorted(consolidated) == sorted(checkpoint.names())
            for name in checkpoint.names():
                assert torch.equal(consolidated[name], checkpoint.tensor(name)), (checkpoint.directory, name)
    assert compared > 100
    if saved != loaded:  # AMI starting from an MLE run's networks saved on other ranks, under another stage
        cfg["ami"].update(init_forward=str(source / "checkpoints" / "forward"),
                          init_backward=str(source / "checkpoints" / "backward"))
        started = tmp_path / "started"
        _launch(1, [str(WORKER), str(write_config(tmp_path, cfg, "init.yaml")), preset, "-", "-", str(started)])
        for network in ("forward", "backward"):
            before = ZeroCheckpoint(source / "checkpoints" / network / "step5")
            after = ZeroCheckpoint(started / "checkpoints" / network / "step0")
            for name in before.names():
                assert torch.equal(before.tensor(name), after.tensor(name)), (network, name)
