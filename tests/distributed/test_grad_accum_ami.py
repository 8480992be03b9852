"""Gradient accumulation in AMI runs: with ``train.grad_accum`` = G, every optimizer update of every engine
accumulates G micro-batches of one loss only (never an MLE and an adversarial loss mixed in one update),
and each engine steps exactly as often as with G = 1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed

G = 3
MLE, NOISE_PRE, CYCLES, NOISE, FORWARD, BACKWARD = 2, 1, 2, 1, 2, 2


def test_each_update_accumulates_one_loss_over_the_micro_batches(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        train={"batch_size": 8 * 2 * G, "grad_accum": G, "mle_steps": MLE},
        model={"emb_dim": 16, "hidden_size": 16},
        lns={"k": 2},
        ami={"enabled": True, "noise_pretrain_steps": NOISE_PRE, "cycles": CYCLES, "noise_steps": NOISE,
             "forward_steps": FORWARD, "backward_steps": BACKWARD, "adv_every": 1},
        tracking={"enabled": False},
    )
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29663",
         str(ROOT / "tests/distributed/accum_worker.py"), str(write_config(tmp_path, cfg)),
         str(ROOT / "configs/ds_zero2.json"), str(tmp_path)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "calls_rank0.json").read_text())
    for engine in ("forward", "backward", "noise"):
        calls = [c for c in result["calls"] if c["engine"] == engine]
        windows, current = [], []
        for call in calls:
            current.append(call)
            if call["boundary"]:
                windows.append(current)
                current = []
        assert not current, f"{engine}: {len(current)} calls after its last optimizer step"
        for window in windows:  # one optimizer update: G micro-batches, one loss, one training step
            assert len(window) == G, window
            assert len({c["update"] for c in window}) == 1, window
            assert len({c["step"] for c in window}) == 1, window
        assert result["global_steps"][engine] == len(windows)
    # as many updates as with G = 1: each MLE / noise batch once, each adversarial batch once more
    assert result["global_steps"] == {"forward": MLE + CYCLES * 2 * FORWARD, "backward": MLE + CYCLES * 2 * BACKWARD,
                                      "noise": NOISE_PRE + CYCLES * NOISE}
