"""Does the critic survive long backward phases? The bounded demotion against the release's unbounded one.

From one MLE checkpoint of the demo (``--pretrain`` steps), the backward network runs ``--batches`` batches
of the adversarial stage's backward phase, each an MLE step plus an adversarial step (``ami.adv_every: 1``),
once with ``ami.demotion: bounded`` (the default) and once with ``unbounded``, and once with MLE steps only
(``ami.adv_every`` past the phase: no demotion) as the reference, every ``--every`` batches evaluated on the
validation split. Prints the backward network's validation perplexity on real pairs over the batches,
against its value at the MLE checkpoint, and the share of synthetic pairs still inside the margin.
The goal (issue 15): bounded stays within 10% of the MLE value over at least 2,000 adversarial batches.
Runs that finished in an earlier invocation with the same ``--work`` are kept.

Usage: python benchmarks/demotion_bound.py [--pretrain 700] [--batches 2000] [--every 250] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runs import ROOT, create_parent, train_run  # this script's own directory is on sys.path

EXPERIMENT = "demotion-bound"
CONFIG = "configs/nmt_demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", type=int, default=700)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default="runs/demotion_bound")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlflow.tracking import MlflowClient

    work = Path(args.work).resolve()
    store = work / "mlflow.db"
    work.mkdir(parents=True, exist_ok=True)
    parent = create_parent(store, EXPERIMENT, "demotion-bound", {"kind": "experiment"})
    common = [f"run.seed={args.seed}", "train.save_every=0", "train.log_every=10"]
    pre = train_run(work / "pretrain", CONFIG, [*common, "run.name=pretrain", "ami.enabled=false",
                                                f"train.mle_steps={args.pretrain}"], store, EXPERIMENT, parent)
    start = [f"ami.init_forward={pre / 'checkpoints/forward'}", f"ami.init_backward={pre / 'checkpoints/backward'}",
             f"vocab.model={pre / 'spm.model'}", "ami.enabled=true", "train.mle_steps=0",
             "ami.noise_pretrain_steps=0", "ami.cycles=1", "ami.noise_steps=0", "ami.forward_steps=0",
             f"ami.backward_steps={args.batches}", f"train.valid_every={args.every}",
             "train.eval_before_training=true"]
    arms = {"bounded": ["ami.adv_every=1", "ami.demotion=bounded"],
            "unbounded": ["ami.adv_every=1", "ami.demotion=unbounded"],
            "mle-only": [f"ami.adv_every={args.batches}"]}  # one adversarial step at the very end
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(train_run, work / name, CONFIG, [*common, f"run.name={name}", *start, *extra],
                                     store, EXPERIMENT, parent) for name, extra in arms.items()}
        dirs = {name: f.result() for name, f in futures.items()}
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    curves = {}
    infos = [client.get_run((d / "mlflow_run_id").read_text().strip()).info for d in [pre, *dirs.values()]]
    minutes = (max(i.end_time for i in infos) - min(i.start_time for i in infos)) / 60000  # as the runs ran
    for name, run_dir in dirs.items():
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        curves[name] = {m.step: m.value for m in client.get_metric_history(run_id, "valid/bw_ppl")}
        inside = sorted(client.get_metric_history(run_id, "bw/demoted_fraction"), key=lambda m: m.step)
        curves[name + " inside margin"] = {m.step: m.value for m in inside}
    steps = sorted(curves["bounded"])
    start_ppl = curves["bounded"][0]
    lines = [f"Backward network's validation perplexity over {args.batches} backward-phase batches from the "
             f"{args.pretrain}-step MLE checkpoint (seed {args.seed}; {start_ppl:.2f} at the checkpoint; "
             f"{minutes:.0f} min with two runs at a time). In brackets: against the checkpoint, and for "
             "the demotions against the MLE-only run at the same batch.", "",
             "| batches | " + " | ".join(arms) + " | bounded: share inside the margin |",
             "|---:|" + "---:|" * (len(arms) + 1)]
    for step in steps:
        cells = []
        for name in arms:
            value = curves[name][step]
            versus = "" if name == "mle-only" else f", {value / curves['mle-only'][step] - 1:+.0%}"
            cells.append(f"{value:.2f} ({value / start_ppl - 1:+.0%}{versus})")
        near = [v for s, v in curves["bounded inside margin"].items() if step - args.every < s <= step]
        lines.append(f"| {step} | " + " | ".join(cells) + (f" | {sum(near) / len(near):.2f} |" if near else " | |"))
    above = max(curves["bounded"].values()) / start_ppl - 1
    apart = max(abs(curves["bounded"][s] / curves["mle-only"][s] - 1) for s in steps)
    blown = max(curves["unbounded"].values()) / start_ppl
    height = "never above the checkpoint's" if above <= 0 else f"at most {above:+.1%} against the checkpoint"
    lines += ["", f"bounded: {height} and within {apart:.1%} of the MLE-only run at every evaluation (goal: within "
              f"10%); unbounded: up to {blown:.0f}x the checkpoint's"]
    report = "\n".join(lines) + "\n"
    (work / "demotion_bound.md").write_text(report, encoding="utf-8")
    client.log_artifact(parent, str(work / "demotion_bound.md"))
    client.set_terminated(parent, "FINISHED")
    print(report)


if __name__ == "__main__":
    main()
