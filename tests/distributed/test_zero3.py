"""ZeRO-3 that saves memory: networks built under deepspeed.zero.Init hold only their partitions from the start,
start from the weights of a plain construction, and train (on 1 and 2 ranks) to the weights plain PyTorch
reaches; the float32 master is the weights' own partition on CPU; the gradient buffer is held only from a
backward pass to the end of the step; "auto" buffers are sized from the network."""

from __future__ import annotations

import json
import subprocess

import pytest

from ami_dist.distributed.engines import load_preset, size_buffers
from ami_dist.distributed.env import _free_port
from ami_dist.errors import ConfigError
from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.distributed


# The Transformer with SGD: its attention key biases have a gradient of zero in exact arithmetic (a shift of
# every key's score leaves the softmax as it is), so Adam turns their rounding noise, which differs with the
# order of the sums, into updates of ±lr, under ZeRO-2 and ZeRO-3 alike.
@pytest.mark.parametrize(("optimizer", "family", "ranks", "accum"), [
    ("sgd", "lstm", 2, 1), ("adam", "lstm", 2, 1), ("sgd", "transformer", 2, 1), ("adam", "lstm", 1, 1),
    ("sgd", "lstm", 2, 2)])
def test_zero3_built_partitioned_trains_like_plain_torch(optimizer: str, family: str, ranks: int, accum: int) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(_free_port()),
         str(ROOT / "tests/distributed/zero3_worker.py"), optimizer, family, str(accum)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in results) == list(range(ranks))
    for r in results:
        assert r["partitioned_from_construction"], "a parameter was whole on a rank after construction"
        assert r["init_max_abs_diff"] == 0.0 and r["same_rng_after"], r  # the same numbers, the same RNG state
        assert r["moved"] > 1e-2
        assert r["max_abs_diff"] < 1e-6, r
        assert r["master_shares_weights"] and "shared_master_weights" in r["adapter"], r
        assert "mmap_large_allocations" in r["adapter"], r
        assert r["reduce_bucket_size"] == r["largest_param"], r
        assert "stage3_gradients_for_the_step" in r["adapter"], r
        held = r["gradient_buffer"]  # held while there are gradients, released once the step has used them
        assert held["built"] == 0 and held["after_step"] == [0] * r["steps"], held
        assert held["after_backward"] == [r["partition_numel"]] * (r["steps"] * accum), held
        assert held["step_on_views"] == [True] * r["steps"], held


def test_auto_buffers_are_sized_from_the_largest_parameter() -> None:
    cfg = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 123,
                                 "stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": "auto"}}
    size_buffers(cfg, [10, 4000, 7])
    assert cfg["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 4000, "stage3_prefetch_bucket_size": 123,
                                        "stage3_max_live_parameters": 8000, "stage3_max_reuse_distance": 8000}


def test_a_preset_buffer_size_must_be_a_number_or_auto(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "big"}}))
    with pytest.raises(ConfigError, match=r"ds.json: zero_optimization.reduce_bucket_size: expected a positive"):
        load_preset(path)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    assert load_preset(path)["zero_optimization"]["reduce_bucket_size"] == "auto"
