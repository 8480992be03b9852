"""The fixed critic: a frozen backward network that scores every arm's outputs alike (valid/mi_logq_fixed).

AMI trains its backward network to score synthetic pairs low, so that network's own log q(S|T̂) cannot be
compared between an AMI run and an MLE run. The fixed critic is the backward network as it was when AMI
started: ``eval.fixed_critic`` names a checkpoint directory (``checkpoints/backward`` of an MLE run, the
same for every arm of an experiment), or else an AMI run saves its backward network's weights to
``RUN_DIR/fixed_critic.pt`` at the first step after MLE pretraining.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ami_dist.distributed.engines import full_parameters
from ami_dist.distributed.safe_load import safe_torch_load
from ami_dist.errors import UserError
from ami_dist.models import Seq2Seq, build_model

CRITIC_FILE = "fixed_critic.pt"


def save_critic_snapshot(run: Any) -> None:
    """Write the backward network's weights as the run's fixed critic (collective: ZeRO-3 gathers them)."""
    params = full_parameters(run.network("backward").engine)
    if run.comm.is_main:
        path = run.run_dir / CRITIC_FILE
        tmp = path.with_name(path.name + ".tmp")
        torch.save(params, tmp)
        os.replace(tmp, path)
    run.comm.barrier()


def critic_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of the newest checkpoint of one network (any ZeRO stage)."""
    from ami_dist.export import consolidate
    from ami_dist.training.checkpoint import read_latest

    checkpoint_dir = Path(checkpoint_dir)
    return consolidate(checkpoint_dir, read_latest(checkpoint_dir))


def build_critic(weights: dict[str, torch.Tensor], model_cfg: Any, vocab_size: int, pad_id: int,
                 where: str | Path) -> Seq2Seq:
    """A frozen network of ``model_cfg`` holding ``weights`` (eval mode, no gradients), on the CPU."""
    model = build_model(model_cfg, vocab_size, pad_id)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in weights or weights[name].shape != param.shape:
                raise UserError(f"{where}: the fixed critic's weights do not fit the model ({name}): it must be a "
                                "backward network of the same model config and vocabulary")
            param.copy_(weights[name])
    return model.eval().requires_grad_(False)


def load_fixed_critic(run: Any) -> Seq2Seq | None:
    """The run's fixed critic on its device in eval mode, or None where there is none (yet)."""
    cfg = run.cfg
    if cfg.eval.fixed_critic is not None:
        weights = critic_weights(cfg.eval.fixed_critic)
        where = cfg.eval.fixed_critic
    elif cfg.ami.enabled and (run.run_dir / CRITIC_FILE).is_file():
        weights = safe_torch_load(run.run_dir / CRITIC_FILE)
        where = str(run.run_dir / CRITIC_FILE)
    else:
        return None
    critic = build_critic(weights, cfg.model, len(run.vocab), run.vocab.pad_id, where)
    return critic.to(run.network("backward").engine.device)
