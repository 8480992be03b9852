"""Side-by-side comparison of MLflow runs: a markdown table and PNG plots, also logged to MLflow.

    python -m ami_dist.compare --experiment ami-dist-demo            # every run of an experiment
    python -m ami_dist.compare --runs 3419b3ac... 61b523d1... --out comparison/

Writes ``comparison.md`` (settings that tell the runs apart and the final validation metrics),
``valid_bleu.png`` / ``losses.png`` (validation BLEU and MLE losses over steps) and, for AMI runs,
``ami_phases.png`` (noise strength, distinct samples, reward spread, the critic's log q of real and
synthetic pairs), then logs them as the artifacts of a new "comparison" run in the same experiment (nested
under the compared runs' parent run when they all have the same one, e.g. the arms of a benchmark).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ami_dist.entry import Parser, command
from ami_dist.errors import UserError

PARAMS = ["run.task", "model.family", "model.hidden_size", "model.enc_layers", "ami.enabled", "ami.cycles",
          "lns.k", "lns.scale", "ami.demotion", "optim.name", "train.batch_size", "train.mle_steps", "world_size",
          "zero_stage"]
FINAL = ["valid/fw_bleu", "valid/fw_chrf", "valid/fw_distinct1", "valid/fw_distinct2", "valid/fw_length",
         "valid/mi_logq", "valid/mi_logq_fixed", "valid/fw_ppl", "valid/bw_bleu", "valid/bw_ppl"]
CURVES = {"valid_bleu.png": ["valid/fw_bleu", "valid/bw_bleu"], "losses.png": ["fw/mle_nll", "bw/mle_nll"],
          # what the AMI phases do: the noise's size, how much its K samples differ, what the critic makes of them
          "ami_phases.png": ["noise/strength", "fw/distinct_samples", "fw/reward_std", "bw/real_logq",
                             "bw/synth_logq"]}


def find_runs(client: Any, run_ids: list[str], experiment: str | None) -> list[Any]:
    """The runs to compare: by id, or every training run of an experiment (oldest first)."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise UserError(f"MLflow run {run_id} not found in {client.tracking_uri}") from None
        return runs
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"MLflow experiment {experiment!r} not found in {client.tracking_uri}")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if r.data.tags.get("kind") not in ("evaluation", "comparison", "experiment")]
    if not runs:
        raise UserError(f"MLflow experiment {experiment!r} has no training runs to compare")
    return runs


def _label(run: Any) -> str:
    return f"{run.info.run_name} ({run.info.run_id[:8]})"


def table(runs: list[Any]) -> str:
    """Markdown: one column per run; params that differ between runs, then the final metric values."""
    params = [p for p in PARAMS if len({r.data.params.get(p, "") for r in runs}) > 1 or len(runs) == 1]
    lines = ["| | " + " | ".join(_label(r) for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    lines.append("| status | " + " | ".join(r.info.status for r in runs) + " |")
    for p in params:
        lines.append(f"| {p} | " + " | ".join(r.data.params.get(p, "") for r in runs) + " |")
    for m in FINAL:
        values = [r.data.metrics.get(m) for r in runs]
        if any(v is not None for v in values):
            lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.4g}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def plot(client: Any, runs: list[Any], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for run in runs:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], marker="o", markersize=3,
                        label=_label(run))
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(uri: str, run_ids: list[str], experiment: str | None, out: Path, log: bool = True) -> list[Path]:
    from mlflow.tracking import MlflowClient

    from ami_dist.tracking import MlflowTracker

    client = MlflowClient(tracking_uri=uri)
    runs = find_runs(client, run_ids, experiment)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "comparison.md"]
    written[0].write_text(f"# Comparison of {len(runs)} runs\n\n{table(runs)}", encoding="utf-8")
    for name, keys in CURVES.items():
        if not any(key in r.data.metrics for r in runs for key in keys):
            continue  # e.g. the AMI phases' curves of MLE-only runs
        plot(client, runs, keys, out / name)
        written.append(out / name)
    if log:
        experiment_name = client.get_experiment(runs[0].info.experiment_id).name
        tags = {"kind": "comparison", "compared_runs": ",".join(r.info.run_id for r in runs)}
        parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
        if len(parents) == 1 and None not in parents:  # the arms of one experiment: the comparison is one of them
            tags["mlflow.parentRunId"] = parents.pop()
        tracker = MlflowTracker(uri, experiment_name, "comparison", tags,
                                buffer_dir=out, start_offline=True)  # a server gone since the runs were read
        for path in written:
            tracker.log_artifact(path, "comparison")
        tracker.finish()
        if tracker.run_id is not None:
            print(f"logged to MLflow run {tracker.run_id}")
    return written


@command
def main(argv: list[str] | None = None) -> int:
    from ami_dist.tracking import resolve_uri

    parser = Parser(prog="python -m ami_dist.compare", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--runs", nargs="+", default=[], metavar="RUN_ID")
    which.add_argument("--experiment")
    parser.add_argument("--uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--out", default="comparison", help="output directory")
    parser.add_argument("--no_mlflow", action="store_true", help="do not log the comparison to MLflow")
    args = parser.parse_args(argv)
    written = compare(resolve_uri(args.uri), args.runs, args.experiment, Path(args.out), not args.no_mlflow)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
