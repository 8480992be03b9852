"""Where a process sits in a Slurm job: rank, world size, local rank and master from Slurm's variables,
and the launcher still known as Slurm when asked again (the CLI asks before and inside init)."""

from __future__ import annotations

from ami_dist.distributed.env import detect_launch

SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x4)",
              "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456"}


def test_slurm_variables_become_what_torch_distributed_reads() -> None:
    env = dict(SLURM_TASK)
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("slurm", 5, 8, 1, 2)
    assert info.master_addr == "gpu07"  # the first host of the job's node list
    assert info.master_port == 29500 + 123456 % 10000
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "gpu07")


def test_asking_twice_still_says_slurm() -> None:
    env = dict(SLURM_TASK)
    detect_launch(env)
    again = detect_launch(env)  # RANK is set now, by us
    assert (again.launcher, again.rank, again.world_size) == ("slurm", 5, 8)


def test_a_port_from_the_batch_script_wins() -> None:
    env = dict(SLURM_TASK, MASTER_ADDR="gpu09", MASTER_PORT="20123")
    info = detect_launch(env)
    assert (info.master_addr, info.master_port) == ("gpu09", 20123)


def test_torchrun_inside_slurm_keeps_torchrun_s_ranks() -> None:
    env = dict(SLURM_TASK, RANK="3", WORLD_SIZE="16", LOCAL_RANK="3")
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size) == ("deepspeed/torchrun", 3, 16)


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports_after() -> None:
    """DeepSpeed's autotuner imports MLflow (≈120 MB per rank) when it can; ranks that do not track skip it."""
    import subprocess
    import sys

    code = ("import sys; from ami_dist.distributed.deepspeed_adapter import import_deepspeed; "
            "import_deepspeed('gloo'); "
            "assert 'deepspeed' in sys.modules; assert 'mlflow' not in sys.modules, 'mlflow imported'; "
            "import mlflow; print('ok', mlflow.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].startswith("ok ")


def _one_rank_env(port: str, **extra: str) -> dict[str, str]:
    """The environment of a 1-rank job (as a launcher sets it) on ``port``."""
    import os

    return {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **extra}


def test_no_shared_memory_segment_is_left_behind(tmp_path) -> None:
    """DeepSpeed's CPU backend would build a shared-memory all-reduce op (its inference path) and leave a
    69 MB /dev/shm segment per rank of a local launch; ami-dist's ranks create none."""
    import os
    import subprocess
    import sys

    from ami_dist.distributed.env import _free_port

    port = str(_free_port())
    env = _one_rank_env(port, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    code = ("from ami_dist.distributed.comm import init_distributed; import torch.distributed as dist; "
            "init_distributed(60); dist.barrier(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "ok"
    left = [name for name in os.listdir("/dev/shm") if name.startswith("deepspeed_allreduce_buffer")
            and f"_{port}_" in name]
    assert left == [], left
    assert not (tmp_path / "ext").exists()  # nothing was JIT-built either


def test_a_zero_engine_starts_without_the_compiler_stack() -> None:
    """DeepSpeed's ZeRO optimizers import its Muon optimizer, whose module compiles three functions as it
    is imported (AOTAutograd, Inductor, networkx: ~600 modules, ~46 MB per rank); ami-dist defers that.
    (TorchDynamo itself is imported by every torch optimizer's constructor.)"""
    import subprocess
    import sys

    from ami_dist.distributed.env import _free_port
    from tests.conftest import ROOT

    env = _one_rank_env(str(_free_port()))
    code = """
import sys, torch
from ami_dist.config.schema import OptimConfig, TrainConfig
from ami_dist.distributed import build_engine, init_distributed, load_preset, resolve_ds_config
init_distributed(60, 1)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
preset = 'configs/ds_zero2.json'
cfg = resolve_ds_config(load_preset(preset), preset, TrainConfig(batch_size=2), OptimConfig(), 1)
engine = build_engine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), cfg)
engine.backward(engine(torch.ones(2, 4)).sum())
engine.step()
import deepspeed.runtime.zero.muon.original_muon as muon
print('loaded', [m for m in ('torch._functorch.aot_autograd', 'networkx') if m in sys.modules],
      callable(muon.zeropower_via_newtonschulz5))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "loaded [] True"


def test_deferred_compile_compiles_once_on_the_first_call(monkeypatch) -> None:
    import torch

    from ami_dist.distributed.deepspeed_adapter import imports

    compiled = []

    def fake_compile(fn):
        compiled.append(fn)
        return lambda *args: fn(*args) + 100

    monkeypatch.setattr(torch, "compile", fake_compile)

    @imports.compile_on_first_call()
    def double(x):
        return 2 * x

    assert compiled == []  # defining it compiles nothing
    assert double(3) == 106 and double(4) == 108  # the compiled function runs, compiled once
    assert len(compiled) == 1 and double.__name__ == "double"


def test_the_process_group_is_shut_down_at_exit() -> None:
    """init_distributed registers the group's shutdown at exit: a process that exits with it alive can abort
    in gloo's teardown (SIGABRT after its work was done). The handler registered first runs last, and sees
    no group left."""
    import subprocess
    import sys

    from ami_dist.distributed.env import _free_port

    code = ("import atexit, torch.distributed as dist\n"
            "atexit.register(lambda: print('at exit, initialized:', dist.is_initialized(), flush=True))\n"
            "from ami_dist.distributed.comm import init_distributed\n"
            "init_distributed(60)\n"
            "print('initialized:', dist.is_initialized(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_one_rank_env(str(_free_port())), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["initialized: True", "at exit, initialized: False"], out.stdout
