"""Checkpoints: every rank saves its shards of every engine, plus the run's position and its own RNG state.

Layout under ``<run_dir>/checkpoints/``: ``forward/``, ``backward/`` and (AMI runs) ``noise/`` hold
DeepSpeed checkpoints tagged ``step<N>``; ``ranks/step<N>/rank<r>.pt`` holds what differs per rank
(the torch RNG state and the latent-noise stream offset), so a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ami_dist.config import SCHEMA_VERSION
from ami_dist.errors import UserError
from ami_dist.training.context import Run


def _engines(run: Run) -> dict[str, Any]:
    engines = {net.name: net.engine for net in run.networks}
    if run.noise is not None:
        engines["noise"] = run.noise
    return engines


def checkpoint_dir(run: Run, name: str) -> Path:
    return run.run_dir / "checkpoints" / name


def save_checkpoint(run: Run) -> str:
    """Save every engine under tag ``step<N>`` (collective: every rank must call it). Returns the tag."""
    tag = f"step{run.step}"
    client_state: dict[str, Any] = {
        "step": run.step,
        "sampler": run.sampler.state_dict(),
        "schema_version": SCHEMA_VERSION,
    }
    if run.step < run.schedule.total_steps:
        position = run.schedule.position(run.step)
        client_state["schedule"] = {"phase": position.phase.name.lower(), "step_in_phase": position.step_in_phase,
                                    "cycle": position.cycle}
    for name, engine in _engines(run).items():
        engine.save_checkpoint(str(checkpoint_dir(run, name)), tag=tag, client_state=client_state)
    rank_dir = checkpoint_dir(run, "ranks") / tag
    rank_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"torch_rng": torch.get_rng_state(),
                "noise_offset": run.stream.offset if run.stream is not None else 0},
               rank_dir / f"rank{run.comm.rank}.pt")
    return tag


def latest_tag(run_dir: Path) -> str:
    """The tag of the newest complete checkpoint of a run (as written by DeepSpeed's ``latest`` file)."""
    latest = run_dir / "checkpoints" / "forward" / "latest"
    if not latest.is_file():
        raise UserError(f"{run_dir}: no checkpoint to resume from (missing {latest})")
    return latest.read_text(encoding="utf-8").strip()


def resume(run: Run, tag: str) -> None:
    """Load every engine and this rank's state from checkpoint ``tag``; the run continues at its step."""
    client: dict[str, Any] | None = None
    for name, engine in _engines(run).items():
        path, state = engine.load_checkpoint(str(checkpoint_dir(run, name)), tag=tag)
        if path is None:
            raise UserError(f"{checkpoint_dir(run, name)}: checkpoint {tag} not found")
        client = client or state
    assert client is not None
    if client.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{run.run_dir}: checkpoint {tag} has schema version {client.get('schema_version')}, "
                        f"this ami-dist reads {SCHEMA_VERSION}")
    run.step = int(client["step"])
    try:
        run.sampler.load_state_dict(client["sampler"])
    except ValueError as e:
        raise UserError(f"{run.run_dir}: cannot resume checkpoint {tag}: {e}") from None
    rank_file = checkpoint_dir(run, "ranks") / tag / f"rank{run.comm.rank}.pt"
    if not rank_file.is_file():
        raise UserError(f"{rank_file}: missing (was the checkpoint written with a different number of ranks?)")
    state = torch.load(rank_file, weights_only=True)
    torch.set_rng_state(state["torch_rng"])
    if run.stream is not None:
        run.stream.offset = int(state["noise_offset"])
