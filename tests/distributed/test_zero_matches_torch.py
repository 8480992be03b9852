"""ZeRO-1/2 on 2 ranks (gloo), and on 1, reach the weights plain PyTorch reaches with every rank's batch,
with the optimizer updating the model's own float32 storage (zero_cpu.share_master_weights), SGD and fused Adam; the
gradients going through shared memory (distributed/shm_collectives) and the weights kept in it
(deepspeed_adapter/zero_cpu.share_weights_between_ranks), and both through gloo; the
clipping norm from float32 row norms (zero_cpu.sum_of_squares)."""

from __future__ import annotations

import json
import subprocess

import pytest

from ami_dist.distributed.deepspeed_adapter.zero_cpu import SHM_ENV
from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.distributed


STEPS = 4  # zero_vs_torch_worker's


def _run(stage: int, optimizer: str, ranks: int, shm: bool, adapter: bool, port: int) -> list[dict]:
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
         str(ROOT / "tests/distributed/zero_vs_torch_worker.py"), str(ROOT / f"configs/ds_zero{stage}.json"),
         optimizer, "on" if adapter else "off"],
        cwd=ROOT, env={**subprocess_env(), SHM_ENV: "1" if shm else "0"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in results) == list(range(ranks))
    for r in results:
        assert r["moved"] > 1e-2  # the steps did change the weights
        assert r["clipped_steps"] > 0, "no step was clipped: the norm went untested"
        assert r["max_abs_diff"] < 1e-6, r
    return results


@pytest.mark.parametrize(("stage", "optimizer", "ranks", "shm"), [
    (1, "sgd", 2, True), (1, "adam", 2, True), (2, "sgd", 2, True), (2, "adam", 2, True),
    (2, "adam", 2, False), (2, "adam", 1, True)])
def test_zero_training_equals_plain_torch_on_the_whole_batch(stage: int, optimizer: str, ranks: int,
                                                             shm: bool) -> None:
    port = 29643 + stage + 2 * (optimizer == "adam") + 6 * (not shm) + 8 * (ranks == 1)
    for r in _run(stage, optimizer, ranks, shm, True, port):
        assert r["master_shares_model_storage"], "ZeRO keeps a second float32 copy of the weights"
        assert r["blockwise_norm"], "ZeRO's gradient norm is DeepSpeed's float64 one"
        assert r["releasing_flatten"], "ZeRO's step holds every gradient twice"
        applied = set(r["params"]["deepspeed_adapter"].split(","))  # as the run's MLflow params say
        assert applied >= {"shm_all_gather", "shm_gradient_reduce", "blockwise_grad_norm", "shared_master_weights",
                           "releasing_flatten"}, applied
        assert ("shared_flat_weights" in applied) == (shm and ranks > 1), applied
        if shm and ranks > 1:
            # Every step's gradient reduction through the segment; ZeRO-2 keeps only the sums of its own
            # partition, so each rank sums only those (a reduce-scatter). The weights are one segment that
            # both ranks map, so gathering them after the step moves nothing (and every rank's weights,
            # the other's part included, match plain PyTorch above).
            reduced = {"all_reduce": STEPS, "reduce_scatter": 0} if stage == 1 else {"all_reduce": 0,
                                                                                   "reduce_scatter": STEPS}
            assert r["shared_memory_calls"] == {**reduced, "all_gather": 0}, r
            assert r["gathers_in_place"] == STEPS, r
        else:
            assert r["shared_memory_calls"] is None, r
            assert r["gathers_in_place"] == 0, r
        # DeepSpeed's reduction flattens each step's bucket and sends it through gloo; ami-dist reduces it
        # in place between ranks of a machine, and skips it on one rank.
        assert r["deepspeed_bucket_reductions"] == (STEPS if not shm and ranks > 1 else 0), r


@pytest.mark.parametrize(("stage", "optimizer"), [(1, "sgd"), (2, "adam")])
def test_stock_deepspeed_with_the_adapter_off_reaches_the_same_weights(stage: int, optimizer: str) -> None:
    """distributed.deepspeed_adapter: false runs DeepSpeed as it is (nothing carries the adapter's mark, the
    master copy is DeepSpeed's own, each bucket goes through DeepSpeed's reduction) and still matches PyTorch."""
    for r in _run(stage, optimizer, 2, True, False, 29801 + stage):
        assert r["patched"] == [], r["patched"]
        assert not r["master_shares_model_storage"] and not r["blockwise_norm"] and not r["releasing_flatten"]
        assert r["shared_memory_calls"] in (None, {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0}), r
        assert r["gathers_in_place"] == 0, r
        assert r["deepspeed_bucket_reductions"] == STEPS, r
        assert r["params"]["deepspeed_adapter"] == "off: distributed.deepspeed_adapter is false", r["params"]
