"""Worker for test_deepspeed_adapter: DeepSpeed imported through the adapter as told on the command line
(``adapter_worker.py BACKEND VERSION``, VERSION ``installed`` for the real one), then one ZeRO-2 engine
built on a gloo world of one and stepped once; prints one line of JSON saying what of DeepSpeed is whose."""

from __future__ import annotations

import datetime
import json
import sys
import warnings

import torch

from ami_dist.config.schema import OptimConfig, TrainConfig
from ami_dist.distributed.comm import exit_worker
from ami_dist.distributed.deepspeed_adapter import adapter_params, import_deepspeed, patched_attributes
from ami_dist.distributed.engines import build_engine, load_preset, resolve_ds_config

backend, version = sys.argv[1], sys.argv[2]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    deepspeed = import_deepspeed(backend, version=None if version == "installed" else version)
adapter_warnings = [str(w.message) for w in caught if "ami-dist" in str(w.message)]
# The adapter was told the backend; the world itself is gloo (this machine has no GPU).
deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60), verbose=False)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
preset = "configs/ds_zero2.json"
engine = build_engine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                      resolve_ds_config(load_preset(preset), preset, TrainConfig(batch_size=2), OptimConfig(), 1))
engine.backward(engine(torch.ones(2, 8)).sum())
engine.step()
zero = engine.optimizer
master, flat = zero.single_partition_of_fp32_groups[0], zero.bit16_groups_flat[0]
backend_module = sys.modules["deepspeed.comm.torch"]
from deepspeed.runtime import compiler  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

print(json.dumps({
    "patched": patched_attributes(zero),
    "engine_is_deepspeeds": type(engine) is DeepSpeedEngine and type(zero) is DeepSpeedZeroOptimizer,
    "master_shares_model_storage": master.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(),
    "shm_op_is_deepspeeds": backend_module.build_shm_op.__module__ == "deepspeed.comm.torch",
    "compile_is_deepspeeds": compiler.compile.__module__ == "deepspeed.runtime.compiler",
    "warnings": adapter_warnings,
    "params": adapter_params(),
}))
exit_worker()
