"""MLE training of the forward (S→T) and backward (T→S) networks on the same batches."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from ami_dist.data.batching import Batch
from ami_dist.training.checkpoint import save_checkpoint
from ami_dist.training.context import Run
from ami_dist.training.evaluation import evaluate
from ami_dist.training.losses import token_nll


def mle_step(engine, batch: Batch, pad_id: int, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """One micro-step of token-level MLE on a DeepSpeed engine: forward, backward, step.

    Returns the summed NLL (without label smoothing, detached) and the number of target tokens.
    """
    logits = engine(batch.src, batch.src_lengths, batch.tgt_in)
    loss_sum, ntok = token_nll(logits, batch.tgt_out, pad_id, label_smoothing)
    engine.backward(loss_sum / ntok)
    engine.step()
    if label_smoothing:
        with torch.no_grad():
            loss_sum, _ = token_nll(logits, batch.tgt_out, pad_id)
    return loss_sum.detach(), int(ntok)


def train_mle(run: Run) -> dict[str, float]:
    """Train until ``train.max_steps`` optimizer steps; evaluate and checkpoint on schedule and at the end."""
    cfg, comm, vocab = run.cfg, run.comm, run.vocab
    tc = cfg.train
    batches = iter(run.sampler)
    if tc.eval_before_training and run.step == 0:
        evaluate(run)
    # Running sums since the last log line, kept as tensors so the step does not wait on the host.
    sums = {net.short: [torch.zeros((), dtype=torch.float64), 0] for net in run.networks}
    tgt_tokens = 0
    started = time.perf_counter()
    progress = tqdm(total=tc.max_steps, initial=run.step, disable=not comm.is_main, desc="MLE", unit="step",
                    dynamic_ncols=True, mininterval=1.0)
    while run.step < tc.max_steps:
        for _ in range(tc.grad_accum):
            indices = next(batches)
            for net in run.networks:
                loss_sum, ntok = mle_step(net.engine, net.batch(indices, vocab), vocab.pad_id, tc.label_smoothing)
                sums[net.short][0] += loss_sum
                sums[net.short][1] += ntok
                if net.name == "forward":
                    tgt_tokens += int(ntok)
        run.step += 1
        progress.update(1)
        if run.step % tc.log_every == 0 or run.step == tc.max_steps:
            elapsed = time.perf_counter() - started
            values = [float(sums[n.short][0]) for n in run.networks] + [float(sums[n.short][1]) for n in run.networks]
            totals = comm.sum([*values, float(tgt_tokens)])
            k = len(run.networks)
            metrics = {f"{n.short}/mle_nll": totals[i] / max(totals[k + i], 1.0) for i, n in enumerate(run.networks)}
            metrics.update({f"{n.short}/lr": n.engine.get_lr()[0] for n in run.networks})
            metrics["train/tgt_tokens_per_s"] = totals[-1] / max(elapsed, 1e-9)
            run.tracker.log_metrics(metrics, run.step)
            progress.set_postfix({k.replace("/mle_nll", "_nll"): f"{v:.3f}" for k, v in metrics.items()
                                  if k.endswith("nll")} | {"tok/s": f"{metrics['train/tgt_tokens_per_s']:.0f}"})
            for entry in sums.values():
                entry[0].zero_()
                entry[1] = 0
            tgt_tokens = 0
            started = time.perf_counter()
        paused = time.perf_counter()
        if tc.valid_every and run.step % tc.valid_every == 0 and run.step < tc.max_steps:
            evaluate(run)
        if tc.save_every and run.step % tc.save_every == 0 and run.step < tc.max_steps:
            save_checkpoint(run)
        started += time.perf_counter() - paused  # evaluation and saving are not training throughput
    progress.close()
    metrics = evaluate(run)
    save_checkpoint(run)
    return metrics
