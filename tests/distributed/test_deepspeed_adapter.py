"""The DeepSpeed adapter (distributed/deepspeed_adapter): applied on gloo only, for the supported DeepSpeed
versions only; under NCCL, with another version, or switched off, DeepSpeed runs as it is. Replaced methods
pass any call they do not cover on to DeepSpeed's exactly as it was made."""

from __future__ import annotations

import json
import os
import subprocess
import types

import pytest
import torch

from ami_dist.distributed import deepspeed_adapter as adapter
from ami_dist.distributed.deepspeed_adapter import zero_cpu
from ami_dist.distributed.env import _free_port
from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.distributed

ADAPTED_CLASSES = {"deepspeed.comm.torch.TorchBackend.all_gather_into_tensor",
                   "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.allreduce_and_copy",
                   "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.allreduce_and_copy_with_multiple_ranks",
                   "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.get_grad_norm_direct",
                   "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions",
                   "deepspeed.comm.torch.build_shm_op",
                   "DeepSpeedZeroOptimizer().flatten", "DeepSpeedZeroOptimizer().flatten_dense_tensors_aligned",
                   # compiled on their first call, not as DeepSpeed's Muon module is imported
                   "deepspeed.runtime.zero.muon.original_muon.zeropower_via_gram_newtonschulz",
                   "deepspeed.runtime.zero.muon.original_muon.zeropower_via_newtonschulz5",
                   "deepspeed.runtime.zero.muon.original_muon.muon_update",
                   "deepspeed.runtime.zero.muon.muon_optimizer.muon_update"}


def _worker(backend: str, version: str = "installed") -> dict:
    env = {**subprocess_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([PYTHON, str(ROOT / "tests/distributed/adapter_worker.py"), backend, version], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_on_gloo_the_adaptations_are_in_deepspeed_and_marked() -> None:
    """The control for the two tests below: the scan for the mark finds every replaced method."""
    r = _worker("gloo")
    assert set(r["patched"]) == ADAPTED_CLASSES, r["patched"]
    assert r["master_shares_model_storage"] and not r["shm_op_is_deepspeeds"], r
    assert r["warnings"] == [] and r["params"]["deepspeed_version"] == "0.19.8", r


def test_under_nccl_nothing_of_deepspeed_is_replaced() -> None:
    r = _worker("nccl")
    assert r["patched"] == [], r["patched"]
    assert r["engine_is_deepspeeds"] and r["shm_op_is_deepspeeds"] and r["compile_is_deepspeeds"], r
    assert not r["master_shares_model_storage"], "the float32 master copy was rewired under NCCL"
    assert r["warnings"] == [], r["warnings"]
    assert r["params"]["deepspeed_adapter"] == "off: stock DeepSpeed on nccl", r["params"]


def test_an_unsupported_deepspeed_version_runs_stock_with_one_warning() -> None:
    r = _worker("gloo", "0.19.6")
    assert r["patched"] == [] and r["engine_is_deepspeeds"] and r["shm_op_is_deepspeeds"], r
    assert not r["master_shares_model_storage"], r
    assert len(r["warnings"]) == 1, r["warnings"]
    assert "DeepSpeed 0.19.6" in r["warnings"][0] and "0.19.8" in r["warnings"][0], r["warnings"]
    assert r["params"] == {"deepspeed_version": "0.19.6",
                           "deepspeed_adapter": "off: DeepSpeed 0.19.6 is not among 0.19.8"}, r["params"]


def _engine_on(device: str) -> types.SimpleNamespace:
    param = types.SimpleNamespace(device=torch.device(device), dtype=torch.float32)
    return types.SimpleNamespace(module=types.SimpleNamespace(parameters=lambda: iter([param])), optimizer=object())


@pytest.mark.parametrize(("backend", "device", "reaches"), [
    ("gloo", "cpu", True), ("gloo", "cuda", False), ("nccl", "cuda", False), ("nccl", "cpu", False)])
def test_only_cpu_engines_on_gloo_reach_master_sharing(monkeypatch, backend: str, device: str, reaches: bool) -> None:
    """An fp32 model on a CUDA device (or any engine under NCCL) never gets its master copy rewired."""
    state = adapter.AdapterState(decided=True, backend=backend, active=backend == "gloo")
    monkeypatch.setattr(adapter, "state", state)
    reached = []
    monkeypatch.setattr(adapter, "adapt_zero_optimizer", lambda opt: reached.append(opt) or ["shared_master_weights"])
    applied = adapter.adapt_engine(_engine_on(device))
    assert (reached != []) == reaches and (applied == ["shared_master_weights"]) == reaches


def test_a_replaced_method_passes_uncovered_calls_on_exactly_as_made() -> None:
    calls = []

    def original(self, bucket, dtype, rank=None, *extra, output_bucket=None, future=None):
        calls.append((bucket, dtype, rank, *extra, output_bucket, future))
        return "deepspeed"

    def understood(self, bucket, dtype, rank=None, **rest):
        """What the handler reads."""

    seen = []

    def handle(a):
        seen.append(dict(a))
        return "ours" if a["rank"] == 7 else zero_cpu.NOT_HANDLED

    method = zero_cpu.wrap(original, understood, handle)
    assert getattr(method, adapter.MARKER) is True
    assert method("self", [1], "f32", 7) == "ours" and calls == []
    assert method("self", [1], "f32", output_bucket="b", future=3) == "deepspeed"
    assert calls == [([1], "f32", None, "b", 3)]  # an argument the handler does not know reaches DeepSpeed
    assert seen[-1]["rest"] == {"output_bucket": "b", "future": 3}
    handled = len(seen)
    assert method("self", [1], "f32", 1, 2, 3) == "deepspeed"  # does not bind: straight to DeepSpeed
    assert calls[-1] == ([1], "f32", 1, 2, 3, None, None) and len(seen) == handled


def test_a_method_whose_parameters_changed_is_left_as_deepspeed_has_it(monkeypatch) -> None:
    """One DeepSpeed version off, a method may take other parameters: the adaptation is then not installed."""

    class Changed:
        def allreduce_and_copy(self, bucket, dtype):  # renamed and fewer parameters
            return "deepspeed"

    original = Changed.allreduce_and_copy
    monkeypatch.setattr(zero_cpu, "_class_adaptations", lambda: {
        "shm_gradient_reduce": [(Changed, "allreduce_and_copy", zero_cpu._allreduce_and_copy,
                                 zero_cpu._handled_by(zero_cpu._allreduce_and_copy, zero_cpu._gradient_all_reduce))]})
    assert zero_cpu.install_zero_cpu() == []
    assert Changed.allreduce_and_copy is original


def test_nothing_outside_the_adapter_touches_deepspeeds_private_state() -> None:
    """The issue's check, as a test: private DeepSpeed access (``._`` after ``deepspeed.`` or on an engine
    or its optimizer) only inside distributed/deepspeed_adapter."""
    offenders = []
    for folder, _, files in os.walk(ROOT / "ami_dist"):
        if "deepspeed_adapter" in folder:
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for number, line in enumerate(open(path, encoding="utf-8"), 1):
                code = line.split("#")[0]
                if ("deepspeed." in code and "._" in code) or any(
                        f"{obj}._" in code for obj in ("engine", "optimizer", "zero_optimizer")):
                    offenders.append(f"{path}:{number}: {line.strip()}")
    assert offenders == [], offenders
