"""Does AMI help? Continued MLE against the AMI recipe from the same MLE checkpoint, 3 seeds, two tasks.

For each task (``nmt``: the demo's En–De LSTM on Tatoeba; ``dialog``: the paper's dialog LSTM at CPU size on
the bundled PersonaChat, word vocabulary, 3 turns of history) and each seed:

1. ``pretrain``: MLE pretraining of the forward and backward networks (the seed's checkpoint).
2. From that checkpoint (its vocabulary, weights only, fresh optimizers), one run per arm:
   - ``mle``: MLE for as many forward updates as ``ami`` makes in its forward phases, at the adversarial
     stage's learning rate and clipping (``ami.adv_lr``, ``ami.adv_max_grad_norm``), so the arms differ
     only in the adversarial terms;
   - ``ami``: the recipe as shipped (noise pretraining, then cycles of noise / forward / backward phases);
   - ``ami-scale0.1``: the same with the perturbation h + 0.1·δ (the other reading of the paper's λ);
   - ``ami-unbounded``: the same with the release's unbounded demotion term.

Every arm is scored on the validation split (greedy decoding) by the same fixed critic, the pretrained
backward network (``valid/mi_logq_fixed``). Each AMI arm is compared with ``mle``: BLEU and chrF by
sacreBLEU's paired bootstrap, per seed; distinct-2 and the fixed critic's log q(S|T̂) by a paired bootstrap
stratified over the seeds (``ami_dist.significance``). Results go to MLflow (one parent run, every training
run nested under it), to ``WORK/ami_vs_mle.md`` and to ``ami-compare`` plots of each task's first seed.

Usage: python benchmarks/ami_vs_mle.py [--tasks nmt dialog] [--seeds 1 2 3] [--jobs 2] [--work DIR]
(the runs are single processes of one thread each, ``--jobs`` of them at a time; runs that finished in an
earlier invocation with the same ``--work`` are kept, so an interrupted experiment continues).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runs import ROOT, create_parent, train_run  # this script's own directory is on sys.path

sys.path.insert(0, str(ROOT))

EXPERIMENT = "ami-vs-mle"


@dataclass(frozen=True)
class Task:
    config: str
    pretrain: list[str]  # overrides of the MLE pretraining run
    ami: list[str]  # overrides of every AMI arm (its schedule)
    common: list[str] = field(default_factory=list)  # overrides of every run of the task


TASKS = {
    "nmt": Task("configs/nmt_demo.yaml", ["train.mle_steps=700"],
                ["ami.noise_pretrain_steps=100", "ami.cycles=20"]),
    "dialog": Task("configs/dialog_lstm_cpu_small.yaml", ["train.mle_steps=1500"],
                   ["ami.noise_pretrain_steps=100", "ami.cycles=20"],
                   ["data.valid_limit=0", "model.hidden_size=128", "model.emb_dim=128", "ami.strength_cap=1.4"]),
}
ARMS = {"ami": [], "ami-scale0.1": ["lns.scale=0.1"], "ami-unbounded": ["ami.demotion=unbounded"]}


def _train(run_dir: Path, task: Task, seed: int, overrides: list[str], work: Path, parent: str) -> Path:
    name = f"{run_dir.parent.parent.name}-{run_dir.name}-s{seed}"
    return train_run(run_dir, task.config, [f"run.name={name}", f"run.seed={seed}", "train.save_every=0",
                                            "train.valid_every=0", "train.log_every=10", *task.common, *overrides],
                     work / "mlflow.db", EXPERIMENT, parent)


def _arm_overrides(cfg, pretrained: Path, names: list[str]) -> dict[str, list[str]]:
    """From the pretrained checkpoint: the MLE arm at the adversarial stage's optimizer settings, the AMI arms."""
    ami = cfg.ami
    forward_updates = ami.cycles * (ami.forward_steps + ami.forward_steps // ami.adv_every)
    start = [f"ami.init_forward={pretrained / 'checkpoints/forward'}",
             f"ami.init_backward={pretrained / 'checkpoints/backward'}",
             f"vocab.model={pretrained / ('spm.model' if cfg.vocab.kind == 'sentencepiece' else 'vocab.txt')}",
             f"eval.fixed_critic={pretrained / 'checkpoints/backward'}"]
    arms = {"mle": [*start, "ami.enabled=false", f"train.mle_steps={forward_updates}", "optim.schedule=step",
                    f"optim.lr={ami.adv_lr}", "optim.decay_start=1000000000",
                    f"optim.max_grad_norm={ami.adv_max_grad_norm}"]}
    for name in names:
        arms[name] = [*start, "ami.enabled=true", "train.mle_steps=0", *ARMS[name]]
    return arms


def run_all(args: argparse.Namespace, work: Path, parent: str) -> dict[str, dict[int, dict[str, Path]]]:
    """Every run, ``--jobs`` at a time: a seed's arms start as soon as its pretraining is done."""
    from ami_dist.config import load_config

    dirs: dict[str, dict[int, dict[str, Path]]] = {t: {s: {} for s in args.seeds} for t in args.tasks}
    with ThreadPoolExecutor(args.jobs) as pool:
        pending: list[Future] = []

        def arms_of(task_name: str, seed: int, pretrained: Path) -> None:
            task = TASKS[task_name]
            cfg = load_config(ROOT / task.config, [*task.common, *task.ami, *args.set])
            for name, overrides in _arm_overrides(cfg, pretrained, args.arms).items():
                extra = overrides if name == "mle" else [*task.ami, *args.set, *overrides]
                run_dir = work / task_name / f"seed{seed}" / name
                dirs[task_name][seed][name] = run_dir
                pending.append(pool.submit(_train, run_dir, task, seed, extra, work, parent))

        pretrains = {}
        for seed in args.seeds:  # seeds outer: the first seed's arms can start while others pretrain
            for task_name in args.tasks:
                task = TASKS[task_name]
                run_dir = work / task_name / f"seed{seed}" / "pretrain"
                dirs[task_name][seed]["pretrain"] = run_dir
                pretrains[(task_name, seed)] = pool.submit(_train, run_dir, task, seed,
                                                           ["ami.enabled=false", *task.pretrain], work, parent)
        for (task_name, seed), future in pretrains.items():
            arms_of(task_name, seed, future.result())
        for future in pending:
            future.result()
    return dirs


def _final_outputs(run_dir: Path) -> tuple[list[str], list[float]]:
    """The forward network's validation hypotheses and fixed-critic log q of the run's last evaluation."""
    valid = run_dir / "valid"
    step = max(int(p.name.split(".")[1].removeprefix("step")) for p in valid.glob("forward.step*.hyp"))
    hyps = (valid / f"forward.step{step}.hyp").read_text(encoding="utf-8").splitlines()
    logq = [float(x) for x in (valid / f"forward.step{step}.mi_logq_fixed").read_text().split()]
    return hyps, logq


def analyse(args: argparse.Namespace, work: Path, dirs: dict, parent: str, wall_s: float) -> str:
    import numpy as np
    from mlflow.tracking import MlflowClient

    from ami_dist.config import load_config
    from ami_dist.data.corpus import read_split
    from ami_dist.significance import NGrams, distinct_metric, mean_metric, paired_bootstrap, sacrebleu_paired

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"# AMI against continued MLE (commit {commit}, seeds {', '.join(map(str, args.seeds))}, "
             f"validation split, greedy decoding; {wall_s / 60:.0f} min with {args.jobs} runs at a time)\n"]
    metrics = ["valid/fw_bleu", "valid/fw_chrf", "valid/fw_distinct1", "valid/fw_distinct2", "valid/fw_length",
               "valid/mi_logq_fixed", "valid/fw_ppl", "valid/bw_ppl"]
    header = ["BLEU", "chrF", "dist-1", "dist-2", "length", "log q fixed", "fw ppl", "bw ppl"]
    for task_name in args.tasks:
        task = TASKS[task_name]
        cfg = load_config(ROOT / task.config, task.common)
        refs = [t for _, t in read_split(cfg.data, "valid")]
        arms = ["pretrain", "mle", *args.arms]
        lines.append(f"\n## {task_name} ({task.config}, {len(refs)} validation pairs)\n")
        lines.append("| arm | " + " | ".join(header) + " |")
        lines.append("|---|" + "---:|" * len(header))
        for arm in arms:
            values = []
            for seed in args.seeds:
                run_id = (dirs[task_name][seed][arm] / "mlflow_run_id").read_text().strip()
                values.append(client.get_run(run_id).data.metrics)
            cells = []
            for key in metrics:
                got = [v[key] for v in values if key in v]
                digits = 4 if "distinct" in key else 2
                cells.append(f"{np.mean(got):.{digits}f} ± {np.std(got, ddof=1):.{digits}f}" if len(got) > 1
                             else (f"{got[0]:.{digits}f}" if got else ""))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        outputs = {arm: [_final_outputs(dirs[task_name][s][arm]) for s in args.seeds] for arm in ["mle", *args.arms]}
        sizes = [len(refs)] * len(args.seeds)
        lines.append(f"\nAgainst `mle` (difference B − A, mean over seeds; p: two-sided paired bootstrap, 1000 "
                     f"resamples; BLEU/chrF by sacreBLEU per seed, tokenize={cfg.eval.bleu_tokenize}):\n")
        lines.append("| arm | ΔBLEU | p (per seed) | ΔchrF | p (per seed) | Δdist-2 [95% CI] | p | "
                     "Δlog q fixed [95% CI] | p |")
        lines.append("|---|---:|---|---:|---|---:|---:|---:|---:|")
        base_grams = [NGrams(h, 2) for h, _ in outputs["mle"]]
        base_logq = [np.array(q) for _, q in outputs["mle"]]
        for arm in args.arms:
            bleu, chrf = [], []
            for (a, _), (b, _) in zip(outputs["mle"], outputs[arm], strict=True):
                test = sacrebleu_paired(a, b, refs, cfg.eval.bleu_tokenize)
                bleu.append(test["BLEU"])
                chrf.append(test["chrF"])
            d2 = paired_bootstrap(distinct_metric, base_grams, [NGrams(h, 2) for h, _ in outputs[arm]], sizes)
            lq = paired_bootstrap(mean_metric, base_logq, [np.array(q) for _, q in outputs[arm]], sizes)
            lines.append(
                f"| {arm} | {np.mean([b - a for a, b, _ in bleu]):+.2f} | {' / '.join(f'{p:.3f}' for *_, p in bleu)} "
                f"| {np.mean([b - a for a, b, _ in chrf]):+.2f} | {' / '.join(f'{p:.3f}' for *_, p in chrf)} "
                f"| {d2.difference:+.4f} [{d2.low:+.4f}, {d2.high:+.4f}] | {d2.p_value:.3f} "
                f"| {lq.difference:+.4f} [{lq.low:+.4f}, {lq.high:+.4f}] | {lq.p_value:.3f} |")
        lines += _diagnostics(client, dirs[task_name], args)
        _plots(client, work, task_name, dirs[task_name][args.seeds[0]], args.arms)
    return "\n".join(lines) + "\n"


DIAGNOSTICS = {"noise/strength": "‖δ‖", "noise/memory_norm": "‖h‖", "noise/below_cap": "below cap",
               "fw/distinct_samples": "distinct of K", "fw/reward_std": "R spread", "fw/reward": "R",
               "bw/real_logq": "log q real", "bw/synth_logq": "log q synth", "bw/demoted_fraction": "in margin"}


def _diagnostics(client, runs: dict[int, dict[str, Path]], args: argparse.Namespace) -> list[str]:
    """What the AMI phases did, averaged over every logged step of each arm and over the seeds."""
    import numpy as np

    lines = ["\nThe AMI phases, averaged over the logged steps and seeds (‖δ‖, ‖h‖: per position, the perturbation "
             "is s·δ; below cap: share of positions where the strength term has a gradient; distinct of K: "
             "different T̃ among the K samples of a sentence; R spread: std of the reward over them):\n",
             "| arm | " + " | ".join(DIAGNOSTICS.values()) + " |", "|---|" + "---:|" * len(DIAGNOSTICS)]
    for arm in args.arms:
        cells = []
        for key in DIAGNOSTICS:
            per_seed = []
            for seed in args.seeds:
                run_id = (runs[seed][arm] / "mlflow_run_id").read_text().strip()
                history = client.get_metric_history(run_id, key)
                if history:
                    per_seed.append(np.mean([m.value for m in history]))
            cells.append(f"{np.mean(per_seed):.3g}" if per_seed else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _plots(client, work: Path, task_name: str, runs: dict[str, Path], arms: list[str]) -> None:
    from ami_dist.compare import compare

    ids = [(runs[arm] / "mlflow_run_id").read_text().strip() for arm in ["mle", *arms]]
    compare(client.tracking_uri, ids, None, work / f"compare_{task_name}", log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["nmt", "dialog"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--work", default="runs/ami_vs_mle", help="runs, logs, the MLflow store and the results")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of every arm after pretraining (the MLE arm takes ami.adv_lr and "
                        "ami.adv_max_grad_norm from them too)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS), help="AMI arms to run")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    parent = create_parent(work / "mlflow.db", EXPERIMENT, f"ami-vs-mle {'+'.join(args.tasks)}",
                           {"kind": "experiment", "seeds": ",".join(map(str, args.seeds))})
    print(f"MLflow parent run {parent} in sqlite:///{work / 'mlflow.db'}; runs under {work}", flush=True)
    started = time.perf_counter()
    try:
        dirs = run_all(args, work, parent)
        report = analyse(args, work, dirs, parent, time.perf_counter() - started)
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    (work / "ami_vs_mle.md").write_text(report, encoding="utf-8")
    client.log_artifact(parent, str(work / "ami_vs_mle.md"))
    for task_name in args.tasks:
        client.log_artifacts(parent, str(work / f"compare_{task_name}"), f"compare_{task_name}")
    client.set_terminated(parent, "FINISHED")
    print(report)
    print(f"wrote {work / 'ami_vs_mle.md'}; total {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
