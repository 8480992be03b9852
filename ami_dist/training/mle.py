"""The token-level MLE step on one network's DeepSpeed engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ami_dist.data.batching import Batch
from ami_dist.training.losses import token_nll

Update = Callable[[Any, torch.Tensor], object]  # (engine, loss): backward and optimizer step


def plain_update(engine: Any, loss: torch.Tensor) -> None:
    engine.backward(loss)
    engine.step()


def mle_step(engine: Any, batch: Batch, pad_id: int, label_smoothing: float = 0.0,
             update: Update = plain_update) -> tuple[torch.Tensor, int]:
    """One micro-step of token-level MLE on a DeepSpeed engine: forward, then ``update`` (backward and step).

    Returns the summed NLL (without label smoothing, detached) and the number of target tokens.
    """
    real = batch.tgt_out != pad_id  # the generator and the loss see real target tokens only
    target = batch.tgt_out[real]
    logits = engine(batch.src, batch.src_lengths, batch.tgt_in, positions=real)
    loss_sum, ntok = token_nll(logits, target, pad_id, label_smoothing)
    nll = loss_sum.detach()
    if label_smoothing:
        with torch.no_grad():
            nll, _ = token_nll(logits, target, pad_id)
    del logits  # (tokens x vocabulary) floats the backward pass does not need: not kept alive through it
    update(engine, loss_sum / ntok)
    return nll, int(ntok)
