"""The training loop: MLE pretraining, then AMI cycles, with logging, evaluation and checkpoints."""

from __future__ import annotations

import time

from ami_dist.distributed.preemption import Preemption
from ami_dist.progress import progress_bar
from ami_dist.training.checkpoint import save_checkpoint
from ami_dist.training.context import Run
from ami_dist.training.critic import save_critic_snapshot
from ami_dist.training.evaluation import evaluate
from ami_dist.training.meter import Meter
from ami_dist.training.phases import (
    METRICS,
    backward_adversarial,
    forward_adversarial,
    mle_pretrain_step,
    network_mle,
    noise_step,
)
from ami_dist.training.schedule import Phase, Position, Stage
from ami_dist.training.stages import set_stage


def enter_stage(run: Run, stage: Stage) -> None:
    """Put the stage's optimizer settings in force; as AMI starts, keep the backward network as fixed critic."""
    if stage is run.stage:
        return
    starting_ami = stage is not Stage.MLE and run.stage in (None, Stage.MLE)
    run.stage = stage
    set_stage([net.engine.lr_scheduler for net in run.networks], stage)
    if starting_ami and run.step == run.schedule.pretrain_steps and run.cfg.eval.fixed_critic is None:
        save_critic_snapshot(run)
        run.critic = None  # loaded again from the snapshot at the next evaluation


def run_step(run: Run, position: Position, micro: list[list[int]], meter: Meter) -> None:
    """One optimizer step of whatever the schedule says is due, over ``train.grad_accum`` micro-batches.

    Each update an engine makes in the step (the MLE update, then the adversarial one) accumulates its
    gradient over all the micro-batches before the engine steps: DeepSpeed steps an engine at every
    ``grad_accum``-th ``engine.step()`` call, so the calls of one update must come together.
    """
    enter_stage(run, position.stage)
    adversarial = (position.step_in_phase + 1) % run.cfg.ami.adv_every == 0
    if position.phase is Phase.MLE:
        for indices in micro:
            mle_pretrain_step(run, indices, meter)
    elif position.phase is Phase.NOISE:
        for indices in micro:
            noise_step(run, indices, meter)
    else:
        forward = position.phase is Phase.FORWARD
        adversarial_update = forward_adversarial if forward else backward_adversarial
        batches = [network_mle(run, "forward" if forward else "backward", indices, meter) for indices in micro]
        if adversarial:
            for indices, batch in zip(micro, batches, strict=True):
                adversarial_update(run, indices, batch, meter)


def _engines(run: Run) -> dict[str, object]:
    engines = {net.short: net.engine for net in run.networks}
    if run.noise is not None:
        engines["noise"] = run.noise
    return engines


def record_validation(run: Run, metrics: dict[str, float]) -> bool:
    """Rank the validation just made (collective: rank 0 has the metrics). Returns whether its step's checkpoint is
    one of the ``train.keep_best`` best and so must be saved now."""
    selection = run.selection
    if not (selection.keep or selection.patience):
        return False
    value = run.comm.broadcast(metrics.get(selection.metric) if run.comm.is_main else None)
    return selection.record(run.step, value)


def _stop_early(run: Run) -> None:
    tag = save_checkpoint(run)
    reason = run.selection.stop_reason()
    if run.comm.is_main:
        print(f"ami-dist: early stopping after step {run.step} of {run.schedule.total_steps}: {reason}; "
              f"checkpoint {tag}", flush=True)
    run.tracker.set_tags({"early_stopped_at_step": str(run.step), "early_stopping_reason": reason})


def train(run: Run, preemption: Preemption | None = None) -> dict[str, float] | None:
    """Run the schedule from ``run.step`` to its end (or ``train.stop_after_steps``, or ``preemption``, or
    ``train.early_stopping``).

    Returns the final validation metrics (on rank 0), or None when stopped before the end with a checkpoint
    to continue from. A run that stopped early returns its last validation's metrics.
    """
    tc, comm = run.cfg.train, run.comm
    total = run.schedule.total_steps
    end = min(total, run.step + tc.stop_after_steps) if tc.stop_after_steps else total
    meter = Meter(METRICS)
    batches = iter(run.sampler)
    tgt_lengths = run.network("forward").train.tgt_ids
    if run.step < total:  # before a baseline evaluation, which then has the fixed critic of an AMI run
        enter_stage(run, run.schedule.position(run.step).stage)
    if run.selection.exhausted and run.step < total:  # a resumed run that had stopped early stays stopped
        metrics = evaluate(run)
        if comm.is_main:
            print(f"ami-dist: stopped early at step {run.step}: {run.selection.stop_reason()}; raise "
                  "train.early_stopping (or set it to 0) to train on", flush=True)
        return metrics
    if tc.eval_before_training and run.step == 0:
        record_validation(run, evaluate(run))
    tokens = 0
    started = time.perf_counter()
    progress = progress_bar(comm.is_main, total=total, initial=run.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=1.0)
    while run.step < end:
        position = run.schedule.position(run.step)
        run.guard.begin_step(run.step + 1)
        micro = [next(batches) for _ in range(tc.grad_accum)]
        run_step(run, position, micro, meter)
        tokens += sum(len(tgt_lengths[i]) + 1 for indices in micro for i in indices)
        run.step += 1
        progress.update(1)
        skipped = run.guard.end_step()
        if skipped is not None and comm.is_main:
            progress.write(f"ami-dist: warning: {skipped}")
        if run.guard.exhausted:
            progress.close()
            raise run.guard.stop_error(save_checkpoint(run))
        if run.step % tc.log_every == 0 or run.step == end:
            metrics = meter.reduce(comm)
            elapsed = time.perf_counter() - started
            metrics["train/tgt_tokens_per_s"] = comm.sum([float(tokens)])[0] / max(elapsed, 1e-9)
            # DeepSpeed counts the updates it skipped for a non-finite gradient norm, and checkpoints the count
            metrics["train/skipped_updates"] = float(sum(e.skipped_steps for e in _engines(run).values()))
            metrics["schedule/phase"] = float(position.phase)
            metrics["schedule/stage"] = float(position.stage)
            metrics["schedule/cycle"] = float(position.cycle)
            for name, engine in _engines(run).items():
                metrics[f"{name}/lr"] = engine.get_lr()[0]
            run.tracker.log_metrics(metrics, run.step)
            progress.set_postfix({k.split("/")[0] + "_nll": f"{v:.3f}" for k, v in metrics.items()
                                  if k.endswith("mle_nll")} | {"tok/s": f"{metrics['train/tgt_tokens_per_s']:.0f}"})
            tokens = 0
            started = time.perf_counter()
        if preemption is not None and run.step < end and preemption.should_stop(comm):
            break  # every rank agreed on this same step; the checkpoint below is the one to requeue from
        paused = time.perf_counter()
        keep = False
        if tc.valid_every and run.step % tc.valid_every == 0 and run.step < end:
            metrics = evaluate(run)
            keep = record_validation(run, metrics)
            if run.selection.exhausted:
                progress.close()
                _stop_early(run)
                return metrics
        if (keep or (tc.save_every and run.step % tc.save_every == 0)) and run.step < end:
            save_checkpoint(run)
        started += time.perf_counter() - paused  # evaluation and saving are not training throughput
    progress.close()
    if run.step < total:
        save_checkpoint(run)
        return None
    metrics = evaluate(run)
    record_validation(run, metrics)
    save_checkpoint(run)
    return metrics
