"""MLE-only vs MLE+AMI from the same MLE checkpoint, for the same number of steps, in one run.

1. MLE-pretrain the forward and backward networks (``--pretrain`` steps).
2. From that checkpoint (same vocabulary, fresh optimizers), continue with MLE only for ``--steps``.
3. From the same checkpoint, run AMI cycles for the same number of steps.

Prints, for 2 and 3: validation BLEU, chrF, distinct-1/2, mean length, and the backward network's
log-likelihood of the forward network's outputs (valid/mi_logq, the E[log q(S|T)] term of the
mutual-information bound); and the wall time per step of each, so the cost of one AMI cycle can be
read against the same number of MLE steps. Every run goes to the MLflow store in the work directory.

Usage: python benchmarks/ami_vs_mle.py [--config configs/nmt_demo.yaml] [--pretrain 600] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["valid/fw_bleu", "valid/fw_chrf", "valid/fw_distinct1", "valid/fw_distinct2", "valid/fw_length",
           "valid/mi_logq", "valid/fw_ppl", "valid/bw_ppl"]


def train(args: argparse.Namespace, work: Path, name: str, overrides: list[str]) -> Path:
    launcher = ROOT / ".venv/bin/deepspeed"
    cmd = [str(launcher if launcher.exists() else "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
           str(args.port), "ami_dist/train.py", "--deepspeed_config", args.preset, "--config", args.config,
           f"run.name={name}", f"run.output_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
           "tracking.experiment=ami-vs-mle", "train.save_every=0", "train.valid_every=0", *overrides]
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["TQDM_DISABLE"] = "1"
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return next((work / "runs").glob(f"{name}-*"))


def results(work: Path) -> dict[str, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    out = {}
    for run in client.search_runs([client.get_experiment_by_name("ami-vs-mle").experiment_id]):
        name = run.info.run_name
        row = {key: run.data.metrics.get(key, float("nan")) for key in METRICS}
        phases = sorted(client.get_metric_history(run.info.run_id, "schedule/phase"), key=lambda m: m.step)
        if len(phases) > 1:  # logged every step: timestamps give the wall time per step
            row["s_per_step"] = (phases[-1].timestamp - phases[0].timestamp) / 1000 / (phases[-1].step - phases[0].step)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/nmt_demo.yaml")
    parser.add_argument("--preset", default="configs/ds_zero2.json")
    parser.add_argument("--pretrain", type=int, default=600, help="MLE steps before the comparison")
    parser.add_argument("--steps", type=int, default=200, help="steps of each arm (a multiple of the cycle)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--port", type=int, default=29770)
    parser.add_argument("--work", help="keep runs and the MLflow store here (default: a temporary directory)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from ami_dist.config import load_config

    ami = load_config(ROOT / args.config).ami
    cycle = ami.noise_steps + ami.forward_steps + ami.backward_steps
    if args.steps % cycle:
        parser.error(f"--steps must be a multiple of the AMI cycle ({cycle} batches)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        pre = train(args, work, "pretrain", ["ami.enabled=false", f"train.mle_steps={args.pretrain}"])
        start = [f"ami.init_forward={pre / 'checkpoints/forward'}", f"ami.init_backward={pre / 'checkpoints/backward'}",
                 f"vocab.model={pre / 'spm.model'}", "train.log_every=1"]
        train(args, work, "mle", ["ami.enabled=false", f"train.mle_steps={args.steps}", *start])
        train(args, work, "ami", ["ami.enabled=true", "train.mle_steps=0", f"ami.cycles={args.steps // cycle}", *start])
        table = results(work)
    print(f"\nFrom the same {args.pretrain}-step MLE checkpoint, {args.steps} more steps each "
          f"({args.ranks} ranks, {args.preset}, {args.config}):")
    header = ["arm", "BLEU", "chrF", "dist-1", "dist-2", "length", "log q(S|T̂)", "fw ppl", "bw ppl", "s/step"]
    print(" | ".join(header))
    for arm in ("pretrain", "mle", "ami"):
        r = table[arm]
        cells = [f"{r[k]:.2f}" if "distinct" not in k else f"{r[k]:.4f}" for k in METRICS]
        print(" | ".join([arm, *cells, f"{r.get('s_per_step', float('nan')):.3f}"]))
    mle_s, ami_s = table["mle"].get("s_per_step"), table["ami"].get("s_per_step")
    if mle_s and ami_s:
        print(f"\none AMI cycle ({cycle} batches) costs {ami_s / mle_s:.2f}x the time of {cycle} MLE steps "
              "(an MLE step trains both networks; an AMI step trains one, plus K-sample decoding)")


if __name__ == "__main__":
    main()
