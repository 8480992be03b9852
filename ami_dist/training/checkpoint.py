"""Checkpoints: every rank saves its shards of every engine, with the run's position as client state."""

from __future__ import annotations

from pathlib import Path

from ami_dist.config import SCHEMA_VERSION
from ami_dist.training.context import Run


def checkpoint_dir(run: Run, network: str) -> Path:
    return run.run_dir / "checkpoints" / network


def save_checkpoint(run: Run) -> str:
    """Save all engines under tag ``step<N>`` (collective: every rank must call it). Returns the tag."""
    tag = f"step{run.step}"
    client_state = {
        "step": run.step,
        "sampler": run.sampler.state_dict(),
        "schema_version": SCHEMA_VERSION,
    }
    for net in run.networks:
        net.engine.save_checkpoint(str(checkpoint_dir(run, net.name)), tag=tag, client_state=client_state)
    return tag
