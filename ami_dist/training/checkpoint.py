"""Crash-safe checkpoints: complete or absent, never partial; the newest ``train.keep_checkpoints`` kept, and the
``train.keep_best`` best by validation (``checkpoints/best.json``).

Layout under ``<run_dir>/checkpoints/``: ``forward/``, ``backward/`` and (AMI runs) ``noise/`` hold
DeepSpeed checkpoints tagged ``step<N>``; ``ranks/step<N>/rank<r>.pt`` holds what differs per rank (the
torch RNG state and the latent-noise stream offset); ``latest`` names the newest complete tag.

A save writes everything under ``step<N>.partial`` names, every rank fsyncs what it wrote, and after a
barrier rank 0 renames the directories to ``step<N>`` and then, last, replaces ``latest`` (write a
temporary file, fsync, rename). A process killed at any moment leaves ``latest`` pointing at a complete
checkpoint; leftovers of an interrupted save are removed by the next one. The run directory must be on a
filesystem every rank sees (as on a cluster's shared storage).

A checkpoint resumed on another number of ranks, or under ZeRO-3 where it was written by ZeRO-1/2 (or the
reverse), is resharded (:func:`resume`, :mod:`ami_dist.distributed.reshard`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ami_dist.config import SCHEMA_VERSION
from ami_dist.data.batching import check_layout
from ami_dist.data.vocab import vocab_sha256
from ami_dist.disk import free_bytes, is_disk_full, tree_bytes
from ami_dist.distributed.reshard import load_resharded, model_states_file, saved_zero_stage
from ami_dist.distributed.safe_load import safe_torch_load
from ami_dist.errors import RunStopped, UserError
from ami_dist.run_dir import RunDir
from ami_dist.training.context import Run
from ami_dist.training.selection import BEST_FILE

PARTIAL = ".partial"


def _engines(run: Run) -> dict[str, Any]:
    engines = {net.name: net.engine for net in run.networks}
    if run.noise is not None:
        engines["noise"] = run.noise
    return engines


def checkpoint_root(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root, name))
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file's, or a directory's entries', writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _tag_dirs(run: Run, tag: str) -> list[Path]:
    root = checkpoint_root(run.run_dir)
    return [root / name / tag for name in [*_engines(run), "ranks"]]


def save_checkpoint(run: Run) -> str:
    """Save every engine and every rank's state under tag ``step<N>`` (collective). Returns the tag."""
    tag = f"step{run.step}"
    root = checkpoint_root(run.run_dir)
    client_state: dict[str, Any] = {
        "step": run.step,
        "sampler": run.sampler.state_dict(),
        "schema_version": SCHEMA_VERSION,
        "selection": run.selection.state_dict(),
    }
    if run.step < run.schedule.total_steps:
        position = run.schedule.position(run.step)
        client_state["schedule"] = {"phase": position.phase.name.lower(), "step_in_phase": position.step_in_phase,
                                    "cycle": position.cycle}
    if run.comm.is_main:  # leftovers of a save that was killed before it completed
        for stale in _tag_dirs(run, tag + PARTIAL):
            shutil.rmtree(stale, ignore_errors=True)
    # rank 0 checks the space after its clean-up; the other ranks wait for its answer (the barrier the clean-up
    # needs) and all stop together, before anything is written, if the checkpoint would not fit
    short = run.comm.on_main(lambda: _short_of_space(run))
    if short is not None:
        raise RunStopped(_no_space(root, tag, *short))
    try:
        for name, engine in _engines(run).items():
            engine.save_checkpoint(str(root / name), tag=tag + PARTIAL, client_state=client_state, save_latest=False)
        rank_dir = root / "ranks" / (tag + PARTIAL)
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"torch_rng": torch.get_rng_state(),
                    "noise_offset": run.stream.offset if run.stream is not None else 0,
                    "vocab_sha256": vocab_sha256(run.vocab)},
                   rank_dir / f"rank{run.comm.rank}.pt")
        for partial in _tag_dirs(run, tag + PARTIAL):
            if partial.is_dir():
                _fsync_tree(partial)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        if not is_disk_full(e, root):
            raise
        written = sum(tree_bytes(d) for d in _tag_dirs(run, tag + PARTIAL))
        if run.comm.is_main:  # nothing partial stays (a multi-rank run's other ranks are stopped by the watchdog)
            for partial in _tag_dirs(run, tag + PARTIAL):
                shutil.rmtree(partial, ignore_errors=True)
        raise RunStopped(_no_space(root, tag, written, free_bytes(root), None, partial=True)) from None
    run.comm.barrier()  # every rank's shards are on disk
    if run.comm.is_main:
        _commit(run, tag)
    run.comm.barrier()
    return tag


def _short_of_space(run: Run) -> tuple[int, int, str] | None:
    """(bytes a checkpoint needs, bytes free, the newest complete tag) when the newest complete checkpoint's size
    (with a margin) does not fit in what is free on the run directory's filesystem; None when it does, or when
    there is no checkpoint to measure yet."""
    tags = completed_tags(run.run_dir)
    if not tags:
        return None
    need = sum(tree_bytes(d) for d in _tag_dirs(run, tags[-1]))
    free = free_bytes(checkpoint_root(run.run_dir))
    return (need, free, tags[-1]) if free < need * 1.05 + 2**16 else None


def _no_space(root: Path, tag: str, need: int, free: int, previous: str | None, partial: bool = False) -> str:
    latest = root / "latest"
    kept = (f"checkpoint {latest.read_text(encoding='utf-8').strip()} is complete and {latest} names it; free space "
            f"there, then continue with --resume {root.parent}" if latest.is_file() else
            "no earlier checkpoint was completed; free space there, then start the run again")
    what = (f"it ran out after {need / 2**20:.1f} MiB" if partial else
            f"it needs about {need / 2**20:.1f} MiB, the size of {previous}")
    return (f"{root}: no space left on the device for checkpoint {tag} ({what}; {free / 2**20:.1f} MiB free): the "
            f"run stops; {kept}")


def _commit(run: Run, tag: str) -> None:
    root = checkpoint_root(run.run_dir)
    for partial, final in zip(_tag_dirs(run, tag + PARTIAL), _tag_dirs(run, tag), strict=True):
        if final.exists():  # a complete-looking leftover that ``latest`` never pointed at
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync(final.parent)
        if final.parent.name != "ranks":  # DeepSpeed's own pointer, for its tools (zero_to_fp32.py)
            _write_atomically(final.parent / "latest", tag)
    _write_atomically(root / "latest", tag)  # the commit point
    selection = run.selection
    if selection.keep:
        _write_atomically(root / BEST_FILE, json.dumps(selection.summary(), indent=1) + "\n")
        run.tracker.set_tags(selection.tags())
    keep = run.cfg.train.keep_checkpoints
    if keep:
        best = set(selection.kept_tags())
        for old in completed_tags(run.run_dir)[:-keep]:
            if old not in best:
                for directory in _tag_dirs(run, old):
                    shutil.rmtree(directory, ignore_errors=True)


def completed_tags(run_dir: Path) -> list[str]:
    """Tags of the complete checkpoints of a run, oldest first."""
    ranks = checkpoint_root(run_dir) / "ranks"
    tags = [p.name for p in ranks.glob("step*") if p.is_dir() and not p.name.endswith(PARTIAL)]
    return sorted(tags, key=lambda t: int(t.removeprefix("step")))


def has_checkpoint(run_dir: Path) -> bool:
    return (checkpoint_root(run_dir) / "latest").is_file()


def read_latest(network_dir: Path) -> str:
    """The newest tag of one network's checkpoints (``checkpoints/<network>/latest``, DeepSpeed's pointer)."""
    latest = Path(network_dir) / "latest"
    if not latest.is_file():
        raise UserError(f"{network_dir}: not a network's checkpoint directory (no 'latest' file in it; expected "
                        "RUN_DIR/checkpoints/backward or the like)")
    return latest.read_text(encoding="utf-8").strip()


def latest_tag(run_dir: Path) -> str:
    """The tag of the newest complete checkpoint of a run."""
    latest = checkpoint_root(run_dir) / "latest"
    if not latest.is_file():
        raise UserError(f"{run_dir}: no checkpoint to resume from (missing {latest})")
    return latest.read_text(encoding="utf-8").strip()


def resume(run: Run, tag: str) -> None:
    """Load every engine and this rank's state from checkpoint ``tag``; the run continues at its step.

    A checkpoint written on another number of ranks, or under another ZeRO stage (ZeRO-3's files differ from
    ZeRO-1/2's), is resharded (:mod:`ami_dist.distributed.reshard`); the data position is global, so the run
    goes on with the same global batches."""
    client: dict[str, Any] | None = None
    root = checkpoint_root(run.run_dir)
    rank_files = sorted((root / "ranks" / tag).glob("rank*.pt"))  # one per rank that wrote the checkpoint
    resharded = []
    for name, engine in _engines(run).items():
        directory = root / name / tag
        if _needs_resharding(directory, len(rank_files), run.comm.world_size, engine.zero_optimization_stage()):
            state = load_resharded(engine, directory)
            resharded.append(name)
        else:
            try:
                path, state = engine.load_checkpoint(str(root / name), tag=tag)
            except RuntimeError as e:  # shapes that do not fit this run's networks
                first = str(e).strip().splitlines()[0][:300]
                raise UserError(f"{directory}: does not fit this run's {name} network ({first})") from None
            if path is None:
                raise UserError(f"{directory}: checkpoint not found")
        client = client or state
    assert client is not None
    if client.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{run.run_dir}: checkpoint {tag} has schema version {client.get('schema_version')}, "
                        f"this ami-dist reads {SCHEMA_VERSION}")
    run.step = int(client["step"])
    run.selection.load_state_dict(client.get("selection"))
    try:
        run.sampler.load_state_dict(client["sampler"])
    except ValueError as e:
        raise UserError(f"{run.run_dir}: cannot resume checkpoint {tag}: {e}") from None
    own = root / "ranks" / tag / f"rank{run.comm.rank}.pt"
    if len(rank_files) == run.comm.world_size:
        if not own.is_file():
            raise UserError(f"{own}: missing (the checkpoint's rank files are {[f.name for f in rank_files]})")
        state = safe_torch_load(own)
        torch.set_rng_state(state["torch_rng"])
        if run.stream is not None:
            run.stream.offset = int(state["noise_offset"])
        return
    # Another number of ranks: a rank that existed keeps its random stream; a new one starts its own, seeded by
    # the run's seed, its rank and the step. Every rank's latent noise continues past the furthest draw any rank
    # made (each rank's noise seed folds in its rank, so no draw of any rank is repeated).
    states = {f.name: safe_torch_load(f) for f in rank_files}
    if own.name in states:
        torch.set_rng_state(states[own.name]["torch_rng"])
    else:
        torch.manual_seed((run.cfg.run.seed * 1_000_003 + run.comm.rank * 7919 + run.step) % (1 << 63))
    if run.stream is not None:
        run.stream.offset = max(int(s["noise_offset"]) for s in states.values())
    if run.comm.is_main:
        print(f"resharded checkpoint {tag} of {len(rank_files)} ranks onto {run.comm.world_size} "
              f"({', '.join(resharded)})", flush=True)


def check_new_world(run_dir: Path, tag: str, world_size: int, batch_tokens: int) -> None:
    """Before the ranks meet: whether checkpoint ``tag``, if written on another number of ranks, can continue on
    ``world_size`` (its batch arithmetic is checked with the DeepSpeed config). A token-batched run lays its
    steps out for the ranks it started on, and continues on at most that many (``ShardedBucketSampler``)."""
    root = checkpoint_root(run_dir)
    saved = len(list((root / "ranks" / tag).glob("rank*.pt")))
    if saved == world_size or not batch_tokens:
        return
    sampler = safe_torch_load(model_states_file(root / "forward" / tag), "cpu", mmap=True)["sampler"]
    try:
        check_layout(int(sampler.get("world", saved)), world_size, batch_tokens)
    except ValueError as e:
        raise UserError(f"{run_dir}: {e}") from None


def _needs_resharding(directory: Path, saved_world: int, world_size: int, stage: int) -> bool:
    """Whether the checkpoint in ``directory``, written by ``saved_world`` ranks, was written on another world
    size, or with ZeRO-3's files where this engine is ZeRO-1/2 (or the other way round)."""
    return saved_world != world_size or (saved_zero_stage(directory) == 3) != (stage == 3)
