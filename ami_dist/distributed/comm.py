"""The collectives the trainer needs, behind one small object, so nothing else touches torch.distributed."""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ami_dist.distributed.deepspeed_adapter import import_deepspeed
from ami_dist.distributed.env import LaunchInfo, detect_launch, threads_per_rank
from ami_dist.errors import UserError

T = TypeVar("T")


class Comm:
    """This rank's view of the job: who it is, and sums, flags and objects shared across ranks."""

    def __init__(self, info: LaunchInfo) -> None:
        self.info = info
        self.rank = info.rank
        self.world_size = info.world_size
        self.local_rank = info.local_rank
        self.is_main = info.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64, one collective)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([0 if flag else 1], dtype=torch.int32)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for small things such as a vocabulary or a path)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its result to every rank.

        If ``fn`` raises, every rank raises too (the same UserError, or a RuntimeError naming rank 0's
        failure), so no rank is left waiting for a result that never comes.
        """
        outcome: tuple[str, Any] = ("", None)
        failure: BaseException | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except UserError as e:
                outcome, failure = ("user", (type(e), str(e))), e
            except Exception as e:
                outcome, failure = ("crash", f"{type(e).__name__}: {e}"), e
        kind, value = self.broadcast(outcome)
        if failure is not None:
            raise failure
        if kind == "user":
            error_type, message = value
            raise error_type(message)
        if kind == "crash":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


def init_distributed(timeout_s: int = 600, threads: int = 0, adapt_deepspeed: bool = True) -> Comm:
    """Join the process group of whatever launched us (gloo on CPU, nccl on GPU) and set thread counts.

    DeepSpeed is imported once the backend is chosen: on gloo with its CPU adaptations (unless
    ``adapt_deepspeed`` is false: the config's distributed.deepspeed_adapter), on nccl as it is.
    """
    info = detect_launch()
    torch.set_num_threads(threads_per_rank(threads, info.local_world_size))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn it guessed
    # Should DeepSpeed JIT-build an op, keep it with this environment rather than in a per-user cache
    # shared with other environments (a stale lock there once stalled a whole CI run).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed = import_deepspeed(backend, adapt_deepspeed)  # heavy import; only the training path pays for it
    if backend == "nccl":
        # One GPU per local rank whether the launcher shows each rank every GPU of its node or only its own.
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
        # Whatever way the process ends (a benchmark's worker, a test's, a run that raised), its group goes
        # first: a process that exits with the group alive can abort in gloo's teardown ("terminate called
        # without an active exception", SIGABRT) after it has done its work.
        atexit.register(shutdown)
    return Comm(info)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int = 0) -> None:
    """End a worker process (a test's or a benchmark's) whose work is done: shut its group down, flush its
    output, and leave without C++ static destructors. Such processes were seen to abort at exit now and then
    ("terminate called without an active exception", SIGABRT) after writing their results, with the group
    already shut down (a joinable thread, most likely the rendezvous store's, destroyed at teardown)."""
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
