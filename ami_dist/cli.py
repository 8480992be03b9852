"""Command line of ``ami_dist/train.py`` (also ``ami-train``): parse, build, train, close.

User mistakes (config, data, arguments) end with one ``ami-dist: error: ...`` line and exit code 2;
a run that fails after it started is marked FAILED in MLflow and keeps its last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings

from ami_dist.errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors follow our one-line, exit-2 rule
        raise UserError(f"command line: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog="ami_dist/train.py",
        description="Train the forward and backward seq2seq networks of AMI with DeepSpeed; track in MLflow.",
        epilog="Overrides: any config key as key.path=value, e.g. train.mle_steps=200 model.dropout=0.1",
    )
    parser.add_argument("--config", help="run config (YAML), e.g. configs/nmt_demo.yaml")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its newest checkpoint, into the same MLflow run "
                        "(uses RUN_DIR/config.yaml unless --config is given)")
    parser.add_argument("--deepspeed_config", default=None,
                        help="DeepSpeed preset (JSON), e.g. configs/ds_zero2.json "
                        "(default: the config's distributed.deepspeed_config)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.config is None and args.resume is None:
        parser.error("one of --config or --resume is required")
    return args


def _quiet_libraries() -> None:
    # DeepSpeed still calls collectives that torch 2.13 renamed; the warning is theirs to fix, not the user's.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                            category=FutureWarning)
    # DeepSpeed warns on every engine that our client SGD is "untested" under ZeRO; that is by design.
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("torch.distributed", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_training(args: argparse.Namespace) -> int:
    """The whole run; returns the process exit code."""
    from pathlib import Path

    from ami_dist import ops
    from ami_dist.config import load_config
    from ami_dist.distributed import detect_launch, init_distributed, shutdown
    from ami_dist.tracking import absolute_uri, make_tracker, resolve_uri
    from ami_dist.training.build import build_run, make_run_dir, read_corpus, resolve_deepspeed
    from ami_dist.training.checkpoint import latest_tag, resume
    from ami_dist.training.loop import train

    # Everything a user can get wrong is checked before the ranks meet, so a mistake fails fast on
    # every rank instead of leaving the others waiting in a collective.
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None and not (resume_dir / "config.yaml").is_file():
        raise UserError(f"--resume {resume_dir}: not a run directory (no config.yaml in it)")
    cfg = load_config(args.config or resume_dir / "config.yaml", args.overrides)
    ops.set_impl(cfg.lns.impl)
    preset_path = args.deepspeed_config or cfg.distributed.deepspeed_config
    cfg.distributed.deepspeed_config = preset_path  # the saved config says which preset ran
    ds_configs = resolve_deepspeed(cfg, preset_path, detect_launch().world_size)
    tag = latest_tag(resume_dir) if resume_dir is not None else None
    train_pairs, valid_pairs = read_corpus(cfg)
    _quiet_libraries()
    comm = init_distributed(cfg.distributed.timeout_s, cfg.train.threads_per_rank)
    _quiet_libraries()
    run_dir = resume_dir if resume_dir is not None else make_run_dir(cfg, comm)
    run_id_file = run_dir / "mlflow_run_id"
    previous_run = run_id_file.read_text().strip() if resume_dir is not None and run_id_file.is_file() else None
    tracker = make_tracker(cfg.tracking.enabled, comm.is_main, cfg.tracking.uri, cfg.tracking.experiment,
                           cfg.run.name, {"task": cfg.run.task, "model_family": cfg.model.family,
                                          "launcher": comm.info.launcher, "run_dir": str(run_dir)},
                           run_id=previous_run)
    if tracker.run_id and comm.is_main:
        run_id_file.write_text(tracker.run_id + "\n")
        (run_dir / "mlflow_tracking_uri").write_text(absolute_uri(resolve_uri(cfg.tracking.uri)) + "\n")
    try:
        run = build_run(cfg, comm, run_dir, tracker, ds_configs, preset_path, train_pairs, valid_pairs)
        if tag is not None:
            resume(run, tag)
            if comm.is_main:
                print(f"resumed {run_dir} from checkpoint {tag} (step {run.step})", flush=True)
        metrics = train(run)
        if comm.is_main and metrics is None:
            print(f"stopped after step {run.step} of {run.schedule.total_steps} with a checkpoint; continue with "
                  f"--resume {run_dir}", flush=True)
        elif comm.is_main:
            _print_summary(run, metrics, tracker)
        tracker.finish("FINISHED")
    except BaseException as e:
        tracker.set_tags({"failure_reason": f"{type(e).__name__}: {e}"[:500]})
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    shutdown()
    return 0


def _print_summary(run, metrics: dict[str, float], tracker) -> None:
    from ami_dist.tracking import resolve_uri

    lines = [f"finished {run.step} steps; run directory: {run.run_dir}"]
    for net in run.networks:
        direction = "S→T" if net.name == "forward" else "T→S"
        lines.append(
            f"  {net.name:8s} ({direction}) valid BLEU {metrics[f'valid/{net.short}_bleu']:.2f}  "
            f"chrF {metrics[f'valid/{net.short}_chrf']:.2f}  perplexity {metrics[f'valid/{net.short}_ppl']:.2f}"
        )
    lines.append(f"  forward outputs: distinct-1 {metrics['valid/fw_distinct1']:.4f}  distinct-2 "
                 f"{metrics['valid/fw_distinct2']:.4f}  mean length {metrics['valid/fw_length']:.1f}  "
                 f"log q(S|T̂) {metrics['valid/mi_logq']:.3f}")
    lines.append(f"  sacreBLEU signature: {run.bleu_signature}")
    if tracker.run_id:
        uri = resolve_uri(run.cfg.tracking.uri)
        lines.append(f"MLflow run id: {tracker.run_id} (store {uri})")
        lines.append(f"open the UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
                     "  -> http://127.0.0.1:5000")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        return run_training(parse_args(argv))
    except UserError as e:
        print(f"ami-dist: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ami-dist: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
