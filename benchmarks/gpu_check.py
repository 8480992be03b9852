"""The GPU check: one command for a machine with one NVIDIA GPU that says whether ami-dist works there.

    make gpu-check                      # on the GPU machine (its python3, its CUDA PyTorch), at most 8 minutes
    make gpu-check GPU_CHECK_OUT=DIR    # also keep the logs and the JSON of every step in DIR
    make gpu-check DRY=1                # on CPU: every step that does not need CUDA (tests/test_gpu_check.py)

Steps, each a subprocess with its own time limit inside the 8-minute deadline, each a row of the table:

  environment      Python, PyTorch, CUDA, the device; DeepSpeed imported for NCCL with nothing of it replaced
  build            the op's CUDA kernels built for this device (TORCH_CUDA_ARCH_LIST from its capability)
  cuda tests       tests/ops/test_lns_cuda.py: CUDA kernels against the CPU kernels on the same Philox stream
                   (fp32/bf16/fp16/fp64, both gradients, the mask), the reference, gradcheck, opcheck; no skips
  lns benchmark    benchmarks/lns_op.py on the GPU: fused against eager PyTorch and torch.compile, forward and
                   backward, and the bytes per second the fused op achieves against the measured copy bandwidth
  train zero2/3    benchmarks/gpu_check_train.py: the demo recipe (AMI cycles included) under the bf16 ZeRO-2
                   and ZeRO-3 presets on an NCCL world of one: loss falls, nothing non-finite, checkpoint and
                   resume matching the uninterrupted run
  throughput       benchmarks/train_throughput.py: tokens/s of the MLE step and of the adversarial forward step
                   at the paper's dialog LSTM and Transformer sizes

The GPU machine has no package registry: what it lacks (DeepSpeed and what DeepSpeed needs) travels as wheels
in the git-ignored folder gpu_wheels/ (`make gpu-wheels` fills it on a machine with a registry) and is
installed into a temporary folder put first on PYTHONPATH; MLflow is not needed (tracking is off). Exits 0
when every step passes (DRY: passes or is skipped for needing CUDA), 1 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 480
WHEELS = ROOT / "gpu_wheels"

PASS, FAIL, SKIP = "pass", "FAIL", "skipped (needs CUDA)"
DRY_PASS = "pass (CPU)"  # a dry run's step that ran on CPU what it runs on the GPU


@dataclass
class Context:
    dry: bool
    out: Path
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    deadline: float = 0.0
    arch: str = ""  # TORCH_CUDA_ARCH_LIST of the device


@dataclass
class Outcome:
    status: str
    summary: str


@dataclass
class Step:
    name: str
    limit_s: int
    run: Callable[[Context, int], Outcome]


def run_logged(ctx: Context, name: str, cmd: list[str], limit_s: int, env: dict[str, str] | None = None
               ) -> tuple[int, str]:
    """Run ``cmd`` from the repository root with the check's environment; its output goes to OUT/<name>.log.
    Returns the exit code (124 past ``limit_s``) and the output."""
    log = ctx.out / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}.log"
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**ctx.env, **(env or {})}, capture_output=True, text=True,
                              timeout=limit_s)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\n[gpu-check: stopped after {limit_s} s]"
    log.write_text(f"$ {shlex.join(cmd)}\n[{time.perf_counter() - started:.1f} s, exit {code}]\n{text}")
    return code, text


def failure(code: int, text: str) -> Outcome:
    last = [line for line in text.strip().splitlines() if line.strip()][-3:]
    return Outcome(FAIL, f"exit {code}: " + " | ".join(line.strip()[:160] for line in last))


ENVIRONMENT = """
import json, platform
import torch
from ami_dist.distributed.deepspeed_adapter import adapter_params, import_deepspeed, patched_attributes
import sentencepiece, sacrebleu, yaml
cuda = torch.cuda.is_available()
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "sentencepiece": sentencepiece.__version__, "sacrebleu": sacrebleu.__version__}
import_deepspeed("nccl")  # what a GPU run does; on CPU (a dry run) the adapter's decision is what is checked
info.update(adapter_params())
info["patched"] = patched_attributes()
print(json.dumps(info))
"""


def environment(ctx: Context, limit_s: int) -> Outcome:
    code, text = run_logged(ctx, "environment", [ctx.python, "-c", ENVIRONMENT], limit_s)
    if code:
        return failure(code, text)
    info = json.loads(text.strip().splitlines()[-1])
    (ctx.out / "environment.json").write_text(json.dumps(info, indent=2))
    if info["capability"]:
        ctx.arch = "{}.{}".format(*info["capability"])
    summary = (f"{info['device']}" + (f" (sm {ctx.arch}, {info['memory_gib']} GiB)" if ctx.arch else "")
               + f"; Python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), "
               f"DeepSpeed {info['deepspeed_version']}, {info['deepspeed_adapter']}")
    if info["patched"]:
        return Outcome(FAIL, f"DeepSpeed attributes replaced under NCCL: {', '.join(info['patched'][:4])}")
    if not ctx.dry and not ctx.arch:
        return Outcome(FAIL, "torch.cuda.is_available() is False: " + summary)
    return Outcome(PASS if ctx.arch or not ctx.dry else DRY_PASS, summary + "; nothing of DeepSpeed replaced")


HAS_KERNEL = ("import torch; from ami_dist.ops import fused; e = fused.load_error(); "
              "print('cuda' if fused.has_kernel_for(torch.device('cuda')) else 'cpu only' if e is None else e)")


def build(ctx: Context, limit_s: int) -> Outcome:
    if ctx.dry:
        code, text = run_logged(ctx, "build", [ctx.python, "-c", HAS_KERNEL], limit_s)
        found = text.strip().splitlines()[-1] if text.strip() else ""
        if code or found != "cpu only":
            return failure(code, text)
        return Outcome(SKIP, "CPU extension loads; on a GPU: TORCH_CUDA_ARCH_LIST=<capability> "
                       f"{Path(ctx.python).name} setup.py build_ext --inplace")
    started = time.perf_counter()
    env = {"TORCH_CUDA_ARCH_LIST": ctx.arch, "MAX_JOBS": str(os.cpu_count() or 4)}
    code, text = run_logged(ctx, "build", [ctx.python, "setup.py", "build_ext", "--inplace"], limit_s, env)
    if code:
        return failure(code, text)
    code, text = run_logged(ctx, "build_load", [ctx.python, "-c", HAS_KERNEL], 120)
    found = text.strip().splitlines()[-1] if text.strip() else ""
    if code or found != "cuda":
        return Outcome(FAIL, f"built, but the extension has no CUDA kernels: {found[:200]}")
    return Outcome(PASS, f"sm {ctx.arch} in {time.perf_counter() - started:.0f} s")


def cuda_tests(ctx: Context, limit_s: int) -> Outcome:
    cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/ops/test_lns_cuda.py"]
    if ctx.dry:
        code, text = run_logged(ctx, "cuda_tests", [*cmd, "--collect-only"], limit_s)
        collected = re.search(r"(\d+) tests? collected", text)
        if code or not collected:
            return failure(code, text)
        return Outcome(SKIP, f"{collected.group(1)} CUDA tests collected")
    code, text = run_logged(ctx, "cuda_tests", cmd, limit_s)
    passed = re.search(r"(\d+) passed", text)
    skipped = re.search(r"(\d+) skipped", text)
    if code or not passed or skipped:
        return failure(code, text)
    return Outcome(PASS, f"{passed.group(1)} passed, none skipped")


def lns_benchmark(ctx: Context, limit_s: int) -> Outcome:
    out = ctx.out / "lns_op.json"
    args = (["--device", "cpu", "--shapes", "small", "--repeats", "1", "--no-compile"] if ctx.dry
            else ["--device", "cuda", "--repeats", "10"])
    code, text = run_logged(ctx, "lns_benchmark", [ctx.python, "benchmarks/lns_op.py", *args, "--json", str(out)],
                            limit_s)
    if code or not out.is_file():
        return failure(code, text)
    parts = []
    for r in json.loads(out.read_text()):
        compiled = r["compile_over_fused_fwd_bwd"]
        roof = r["roofline_fraction"]
        parts.append(f"L,B,D,K={','.join(map(str, r['shape']))}: fwd+bwd {r['fused_ms']['fwd_bwd']:.2f} ms, "
                     f"eager/fused {r['eager_over_fused_fwd_bwd']:.2f}x"
                     + (f", compile/fused {compiled:.2f}x" if compiled else "")
                     + (f", {roof['fwd_bwd']:.0%} of {r['copy_bandwidth'] / 1e9:.0f} GB/s copy" if roof else ""))
    return Outcome(DRY_PASS if ctx.dry else PASS, ("one repeat: " if ctx.dry else "") + "; ".join(parts))


def train(stage: int) -> Callable[[Context, int], Outcome]:
    def run(ctx: Context, limit_s: int) -> Outcome:
        preset = f"configs/ds_zero{stage}.json" if ctx.dry else f"configs/ds_zero{stage}_gpu_bf16.json"
        out = ctx.out / f"train_zero{stage}.json"
        cmd = [ctx.python, "benchmarks/gpu_check_train.py", "--preset", preset, "--out", str(out)]
        code, text = run_logged(ctx, f"train_zero{stage}", cmd + (["--dry"] if ctx.dry else []), limit_s)
        if not out.is_file():
            return failure(code, text)
        r = json.loads(out.read_text())
        failed = [name for name, ok in r["checks"].items() if not ok]
        summary = (f"{Path(preset).name}, {r['device']}, {r['steps']} steps: MLE nll {r['first_nll']:.2f} -> "
                   f"{r['last_nll']:.2f}, resumed at {r['stop']}: max rel. diff {r['resume_max_rel_diff']:.1e} "
                   f"over {r['resume_compared']} values, valid BLEU {r['valid_bleu'] or 0:.2f}"
                   + (f", peak {r['max_memory_allocated'] / 2**20:.0f} MiB" if r["max_memory_allocated"] else "")
                   + f", {r['seconds']:.0f} s")
        if code or failed:
            return Outcome(FAIL, f"failed {', '.join(failed) or f'exit {code}'}: {summary}")
        return Outcome(DRY_PASS if ctx.dry else PASS, summary)

    return run


def throughput(config: str, dry_config: str) -> Callable[[Context, int], Outcome]:
    def run(ctx: Context, limit_s: int) -> Outcome:
        cfg = dry_config if ctx.dry else config
        preset = "configs/ds_zero2.json" if ctx.dry else "configs/ds_zero2_gpu_bf16.json"
        out = ctx.out / f"throughput_{Path(cfg).stem}.json"
        steps = ["--steps", "2", "--warmup", "1"] if ctx.dry else ["--steps", "20", "--warmup", "5"]
        cmd = [ctx.python, "benchmarks/train_throughput.py", "--config", cfg, "--preset", preset, "--variants",
               "deepspeed,ami", "--no-critical-path", *steps, "--json", str(out)]
        code, text = run_logged(ctx, f"throughput_{Path(cfg).stem}", cmd, limit_s)
        if code or not out.is_file():
            return failure(code, text)
        rows = json.loads(out.read_text())["rows"]
        mle, adv = rows["deepspeed"], rows["ami_adversarial"]
        summary = (f"{Path(cfg).stem}: MLE {mle['tgt_tokens_per_s']:.0f} tgt tok/s ({mle['ms_per_step']:.0f} ms/step), "
                   f"adversarial forward {adv['tgt_tokens_per_s']:.0f} tok/s ({adv['ms_per_step']:.0f} ms/step, "
                   f"{adv['cost_in_mle_steps']:.2f}x an MLE step beyond it)")
        return Outcome(DRY_PASS if ctx.dry else PASS, summary)

    return run


STEPS = [
    Step("environment", 90, environment),
    Step("build", 200, build),
    Step("cuda tests", 90, cuda_tests),
    Step("lns benchmark", 90, lns_benchmark),
    Step("train zero2", 120, train(2)),
    Step("train zero3", 120, train(3)),
    Step("throughput lstm", 90, throughput("configs/dialog_lstm.yaml", "configs/dialog_lstm_cpu_small.yaml")),
    Step("throughput transformer", 90, throughput("configs/dialog_transformer.yaml",
                                                  "configs/dialog_transformer_cpu_small.yaml")),
]


def install_wheels(ctx: Context) -> str:
    """Install gpu_wheels/*.whl into a temporary folder first on PYTHONPATH; what was installed. A dry run
    installs them as for the GPU machine's Python 3.12 and leaves them off the path (this Python may be
    another one)."""
    wheels = sorted(glob.glob(str(WHEELS / "*.whl")))
    if not wheels:
        return "no gpu_wheels/: using what is installed"
    target = ctx.out / "site"
    cmd = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
           str(target), *wheels]
    if ctx.dry:
        cmd[4:4] = ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux2014_x86_64"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"gpu-check: installing gpu_wheels/ failed: {proc.stderr.strip()[-500:]}")
    names = ", ".join(Path(w).name.split("-")[0] for w in wheels)
    if ctx.dry:
        return f"{len(wheels)} wheels from gpu_wheels/ install for Python 3.12 ({names}); not used on this Python"
    ctx.env["PYTHONPATH"] = os.pathsep.join([str(target), ctx.env["PYTHONPATH"]])
    return f"installed {len(wheels)} wheels from gpu_wheels/: {names}"


def run_steps(ctx: Context, steps: list[Step]) -> list[tuple[str, Outcome, float]]:
    rows = []
    for step in steps:
        left = int(ctx.deadline - time.monotonic())
        if left < 10:
            rows.append((step.name, Outcome(FAIL, f"not run: the {DEADLINE_S} s deadline was reached"), 0.0))
            continue
        print(f"gpu-check: {step.name} ...", flush=True)
        started = time.perf_counter()
        try:
            outcome = step.run(ctx, min(step.limit_s, left))
        except Exception as e:  # a step's own bug is a failed row, not a lost table
            outcome = Outcome(FAIL, f"{type(e).__name__}: {e}")
        rows.append((step.name, outcome, time.perf_counter() - started))
    return rows


def table(rows: list[tuple[str, Outcome, float]]) -> str:
    lines = ["| step | status | s | result |", "| --- | --- | ---: | --- |"]
    lines += [f"| {name} | {o.status} | {s:.0f} | {o.summary.replace('|', '/')} |" for name, o, s in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="on CPU: every step that does not need CUDA")
    parser.add_argument("--out", help="keep logs and results here (default: a temporary folder)")
    parser.add_argument("--only", help="comma-separated step names (default: all)")
    args = parser.parse_args()
    steps = [s for s in STEPS if not args.only or s.name in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2" if args.dry else "8",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # a world of one, whatever launched this
        ctx = Context(dry=args.dry, out=out, env=env, deadline=time.monotonic() + DEADLINE_S)
        print(f"gpu-check{' (dry run, CPU)' if args.dry else ''}: {install_wheels(ctx)}", flush=True)
        rows = run_steps(ctx, steps)
        text = table(rows)
        (out / "summary.md").write_text(text + "\n")
        print("\n" + text)
        bad = [name for name, o, _ in rows if o.status == FAIL or (not args.dry and o.status != PASS)]
        print(f"\ngpu-check: {'FAILED: ' + ', '.join(bad) if bad else 'all steps passed'}"
              + (f" (logs in {out})" if args.out else ""))
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
