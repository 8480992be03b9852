"""Command line of ``ami_dist/train.py`` (also ``ami-train``): parse, build, train, close.

User mistakes (config, data, arguments) end with one ``ami-dist: error: ...`` line and exit code 2;
a run that fails after it started is marked FAILED in MLflow and keeps its last checkpoint; a run stopped
by the preemption signal saves a checkpoint and exits with code 75, for its batch job to requeue it.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import warnings
from pathlib import Path

from ami_dist.entry import Parser, command
from ami_dist.errors import UserError
from ami_dist.run_dir import RunDir, check_writable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        prog="ami_dist/train.py",
        description="Train the forward and backward seq2seq networks of AMI with DeepSpeed; track in MLflow.",
        epilog="Overrides: any config key as key.path=value, e.g. train.mle_steps=200 model.dropout=0.1",
    )
    parser.add_argument("--config", help="run config (YAML), e.g. configs/nmt_demo.yaml")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its newest checkpoint, into the same MLflow run "
                        "(uses RUN_DIR/config.yaml unless --config is given)")
    parser.add_argument("--run_dir", metavar="DIR",
                        help="use exactly DIR as the run directory: a new run there or, if DIR already holds one, "
                        "continue it from its newest checkpoint into the same MLflow run with its saved config "
                        "(how a requeued Slurm job finds its run)")
    parser.add_argument("--deepspeed_config", default=None,
                        help="DeepSpeed preset (JSON), e.g. configs/ds_zero2.json "
                        "(default: the config's distributed.deepspeed_config)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.config is None and args.resume is None and args.run_dir is None:
        parser.error("one of --config, --resume or --run_dir is required")
    if args.resume is not None and args.run_dir is not None:
        parser.error("--resume and --run_dir exclude each other (--run_dir DIR continues the run in DIR)")
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
    from ami_dist import ops
    from ami_dist.config import load_config
    from ami_dist.data.prepare import check_enough_pairs, ensure_prepared
    from ami_dist.distributed import detect_launch, init_distributed, shutdown
    from ami_dist.distributed.preemption import EXIT_REQUEUE, Preemption
    from ami_dist.distributed.safe_load import check_init_checkpoint, check_resumable
    from ami_dist.distributed.watchdog import raise_on_sigterm, start_watchdog
    from ami_dist.tracking import NullTracker, Tracker, absolute_uri, make_tracker, resolve_uri
    from ami_dist.training.build import build_run, make_run_dir, resolve_deepspeed
    from ami_dist.training.checkpoint import check_new_world, latest_tag, resume
    from ami_dist.training.loop import train

    # Everything a user can get wrong is checked before the ranks meet, so a mistake fails fast on
    # every rank instead of leaving the others waiting in a collective.
    exact_dir = Path(args.run_dir) if args.run_dir else None
    continuing = exact_dir is not None and RunDir(exact_dir).holds_run()
    resume_dir = exact_dir if continuing else Path(args.resume) if args.resume else None
    if resume_dir is not None and not RunDir(resume_dir).holds_run():
        raise UserError(f"--resume {resume_dir}: not a run directory (no config.yaml in it)")
    if exact_dir is not None and not continuing and args.config is None:
        raise UserError(f"--run_dir {exact_dir}: holds no run yet, so --config is needed to start one")
    # A requeued job repeats its command line, but its checkpoints fit the config the run was saved with.
    cfg = load_config(RunDir(resume_dir).config if continuing else args.config or RunDir(resume_dir).config,
                      args.overrides)
    # Installed early: the signal's default action would end the process.
    preemption = Preemption(cfg.distributed.preempt_signal).install()
    ops.set_impl(cfg.lns.impl)
    preset_path = args.deepspeed_config or cfg.distributed.deepspeed_config
    cfg.distributed.deepspeed_config = preset_path  # the saved config says which preset ran
    launch = detect_launch()
    ds_configs = resolve_deepspeed(cfg, preset_path, launch.world_size)
    if resume_dir is not None:  # checkpoints, validation outputs and logs go where the run is
        check_writable(resume_dir, f"--{'run_dir' if continuing else 'resume'}")
    else:
        check_writable(exact_dir or Path(cfg.run.output_dir), "--run_dir" if exact_dir else "run.output_dir")
    tag = latest_tag(resume_dir) if resume_dir is not None and _has_checkpoint(resume_dir, continuing) else None
    if tag is not None:  # a bad checkpoint fails here, before the ranks meet and the MLflow run is reopened
        check_resumable(resume_dir, tag, cfg)
        check_new_world(resume_dir, tag, launch.world_size, cfg.train.batch_tokens)
    for key in ("init_forward", "init_backward"):  # and so does a bad starting point, before the run directory
        if getattr(cfg.ami, key) is not None:
            check_init_checkpoint(key, getattr(cfg.ami, key))
    # The corpus is prepared (checked, encoded, written memory-mappable) before the ranks meet: by the first
    # rank of a machine to take the cache's lock, while the others wait on it; later starts find it there.
    # A continuing run keeps the vocabulary in its run directory, so it never trains a new one.
    run_vocab = RunDir(resume_dir).vocab(cfg.vocab.kind) if resume_dir is not None else None
    prepared_dir = ensure_prepared(cfg, run_vocab if run_vocab is not None and run_vocab.is_file() else None,
                                   show=launch.local_rank == 0)
    check_enough_pairs(cfg, prepared_dir, launch.world_size)
    _quiet_libraries()
    comm = init_distributed(cfg.distributed.timeout_s, cfg.train.threads_per_rank,
                            cfg.distributed.deepspeed_adapter)
    _quiet_libraries()
    watchdog = start_watchdog(comm.rank, comm.world_size, cfg.distributed.failure_timeout_s,
                              catch_sigterm=cfg.distributed.preempt_signal != "SIGTERM")
    if watchdog is None and cfg.distributed.preempt_signal != "SIGTERM":
        raise_on_sigterm()
    tracker: Tracker = NullTracker()
    code = 0
    try:
        run_dir = resume_dir or (_exact_run_dir(cfg, comm, exact_dir) if exact_dir else make_run_dir(cfg, comm))
        run_id_file = RunDir(run_dir).mlflow_run_id
        previous_run = run_id_file.read_text().strip() if resume_dir is not None and run_id_file.is_file() else None
        tags = {"task": cfg.run.task, "model_family": cfg.model.family, "launcher": comm.info.launcher,
                "run_dir": str(run_dir)}
        if cfg.tracking.parent_run_id:  # how MLflow nests a run under another (an experiment's parent run)
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        tracker = make_tracker(cfg.tracking.enabled, comm.is_main, cfg.tracking.uri, cfg.tracking.experiment,
                               cfg.run.name, tags, run_id=previous_run, buffer_dir=run_dir,
                               system_metrics_s=cfg.tracking.system_metrics_s)
        if watchdog is not None:  # rank 0 records another rank's failure before it exits
            watchdog.on_failure = lambda reason: _record_failure(tracker, reason)
        hosts = comm.gather(socket.gethostname())
        if tracker.run_id and comm.is_main:
            run_id_file.write_text(tracker.run_id + "\n")
            RunDir(run_dir).mlflow_tracking_uri.write_text(absolute_uri(resolve_uri(cfg.tracking.uri)) + "\n")
            tracker.set_tags({"hosts": ",".join(sorted(set(hosts or [])))})
        run = build_run(cfg, comm, run_dir, tracker, ds_configs, preset_path, prepared_dir)
        if tag is not None:
            resume(run, tag)
            if comm.is_main:
                print(f"resumed {run_dir} from checkpoint {tag} (step {run.step})", flush=True)
        metrics = train(run, preemption)
        if preemption.stopped:
            code = EXIT_REQUEUE
            if comm.is_main:
                print(f"preempted ({preemption.signal_name}) after step {run.step} of {run.schedule.total_steps}: "
                      f"checkpoint saved; exit code {EXIT_REQUEUE} asks for a requeue (or continue with "
                      f"--resume {run_dir})", flush=True)
            tracker.set_tags({"preempted_at_step": str(run.step)})
            tracker.finish("SCHEDULED")  # until the requeued job reopens it
        else:
            if comm.is_main and metrics is None:
                print(f"stopped after step {run.step} of {run.schedule.total_steps} with a checkpoint; continue "
                      f"with --resume {run_dir}", flush=True)
            elif comm.is_main:
                _print_summary(run, metrics, tracker)
            tracker.finish("FINISHED")
    except BaseException as e:
        if watchdog is not None:  # tell the other ranks, or, if the cause lies elsewhere, learn which rank
            watchdog.report(e)
        _record_failure(tracker, f"{type(e).__name__}: {e}", "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        try:
            shutdown()  # a process that exits with its group alive can abort in gloo's teardown
        except Exception:
            pass
        raise
    if watchdog is not None:  # every checkpoint shard is written before any rank exits
        watchdog.close(comm.barrier)
    shutdown()
    return code


def _has_checkpoint(run_dir: Path, continuing: bool) -> bool:
    """--resume insists on a checkpoint; a --run_dir job that ended before its first one starts over."""
    from ami_dist.training.checkpoint import has_checkpoint

    return not continuing or has_checkpoint(run_dir)


def _exact_run_dir(cfg, comm, path: Path) -> Path:
    """``path`` itself as a new run directory (created by rank 0, with the resolved config in it)."""
    from ami_dist.config import save_config

    def create() -> str:
        path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, RunDir(path).config)
        return str(path)

    return Path(comm.on_main(create))


def _record_failure(tracker, reason: str, status: str = "FAILED") -> None:
    tracker.set_tags({"failure_reason": reason[:500]})
    tracker.finish(status)


def _print_summary(run, metrics: dict[str, float], tracker) -> None:
    from ami_dist.tracking import resolve_uri, ui_page

    lines = [f"finished {run.step} steps; run directory: {run.run_dir}"]
    for net in run.networks:
        direction = "S→T" if net.name == "forward" else "T→S"
        lines.append(
            f"  {net.name:8s} ({direction}) valid BLEU {metrics[f'valid/{net.short}_bleu']:.2f}  "
            f"chrF {metrics[f'valid/{net.short}_chrf']:.2f}  perplexity {metrics[f'valid/{net.short}_ppl']:.2f}"
        )
    fixed = metrics.get("valid/mi_logq_fixed")
    lines.append(f"  forward outputs: distinct-1 {metrics['valid/fw_distinct1']:.4f}  distinct-2 "
                 f"{metrics['valid/fw_distinct2']:.4f}  mean length {metrics['valid/fw_length']:.1f}  "
                 f"log q(S|T̂) {metrics['valid/mi_logq']:.3f}"
                 + (f" (fixed critic {fixed:.3f})" if fixed is not None else ""))
    lines.append(f"  sacreBLEU signature: {run.bleu_signature}")
    if tracker.run_id:
        uri = resolve_uri(run.cfg.tracking.uri)
        lines.append(f"MLflow run id: {tracker.run_id} (store {uri})")
        page = ui_page(tracker.experiment_id, tracker.run_id) if tracker.experiment_id else ""
        lines.append(f"open the UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
                     f"  -> http://127.0.0.1:5000/{page}")
    print("\n".join(lines), flush=True)


@command
def main(argv: list[str] | None = None) -> int:
    return run_training(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
