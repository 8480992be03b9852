"""ZeRO-1/2 on CPU: what the adapter changes in DeepSpeed's optimizer and collectives, each change measured.

Installed by :func:`ami_dist.distributed.deepspeed_adapter.import_deepspeed` for gloo only (never under
NCCL). Every replaced method takes ``*args, **kwargs``, reads what it needs by binding them to the
parameters it understands, and hands the call on to DeepSpeed's method, untouched, in any case it does
not cover (another backend, device or dtype, asynchronous calls, arguments it does not know).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ami_dist.distributed.deepspeed_adapter.marker import mark
from ami_dist.distributed.shm_collectives import SharedMemoryGroup, global_rank, shared_tensor

NOT_HANDLED = object()  # what a handler returns to have DeepSpeed's own method run


def wrap(original: Callable[..., Any], understood: Callable[..., Any],
         handle: Callable[[dict[str, Any]], Any]) -> Callable[..., Any]:
    """``original`` (a method), with ``handle`` first: it gets the call's arguments bound to the parameters of
    ``understood`` (defaults filled in) and returns the result, or NOT_HANDLED to run ``original`` with the
    arguments exactly as given. A call that does not bind to ``understood`` goes to ``original``."""
    signature = inspect.signature(understood)

    @functools.wraps(original)
    def method(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        bound.apply_defaults()
        result = handle(bound.arguments)
        return original(*args, **kwargs) if result is NOT_HANDLED else result

    method.ami_dist_original = original  # type: ignore[attr-defined]
    return mark(method)


def is_gloo_cpu(group: Any, tensors: list[torch.Tensor]) -> bool:
    """Whether a collective over ``tensors`` on ``group`` runs on gloo with CPU tensors (tested before
    anything else: no other case reads an optimizer's attributes)."""
    return dist.get_backend(group) == "gloo" and all(t.device.type == "cpu" for t in tensors)


def all_gather_by_broadcast(output: torch.Tensor, input_: torch.Tensor, group: Any = None) -> None:
    """``dist.all_gather_into_tensor`` as one broadcast per rank, each from the rank that owns the slice.

    Gloo's all-gather is slower than its all-reduce of twice the data: gathering ZeRO's 19M-parameter
    LSTM (36 MB per rank) between 2 ranks takes 73-79 ms on the 2-core development machine, the two
    broadcasts 37-41 ms and the all-reduce of all 72 MB 54-57 ms (benchmarks/gloo_collectives.py).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    slices = output.view(-1).split(input_.numel())
    if slices[rank].data_ptr() != input_.data_ptr():  # ZeRO passes its own slice of the output
        slices[rank].copy_(input_.reshape(-1))
    for owner in range(world):
        dist.broadcast(slices[owner], global_rank(group, owner), group=group)


SHM_ENV = "AMI_DIST_SHM_COLLECTIVES"
_shared_memory_groups: dict[Any, SharedMemoryGroup | None] = {}


def shared_memory_group(group: Any = None) -> SharedMemoryGroup | None:
    """The shared-memory segment of a gloo ``group`` whose ranks share a machine; None where they do
    not, or where ``AMI_DIST_SHM_COLLECTIVES=0``. The first call for a group is a collective."""
    key = dist.group.WORLD if group is None else group
    if key not in _shared_memory_groups:
        enabled = os.environ.get(SHM_ENV, "1") != "0"
        _shared_memory_groups[key] = SharedMemoryGroup.attach(group) if enabled else None
    return _shared_memory_groups[key]


def _all_gather_into_tensor(self: Any, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any = None,
                            async_op: bool = False) -> Any:
    """The parameters of TorchBackend.all_gather_into_tensor this adapter reads."""


def _fast_all_gather(a: dict[str, Any]) -> Any:
    output, input_, group = a["output_tensor"], a["input_tensor"], a["group"]
    if (a["async_op"] or not isinstance(output, torch.Tensor) or not isinstance(input_, torch.Tensor)
            or not is_gloo_cpu(group, [output, input_]) or not output.is_contiguous()):
        return NOT_HANDLED
    if _gathered_already(output, input_, group):
        stats["gathers_in_place"] += 1
        dist.barrier(group=group)  # every rank has written its part: now each may read the others'
        return None
    shm = shared_memory_group(group)
    if shm is not None:
        shm.all_gather_into(output, input_)
    else:
        all_gather_by_broadcast(output, input_, group)
    return None


_shared_weights: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}  # storage address: (flat weights, group)
stats = {"gathers_in_place": 0}  # all-gathers of shared weights, which only wait for every rank


def _gathered_already(output: torch.Tensor, input_: torch.Tensor, group: Any) -> bool:
    """Whether ``output`` is flat weights that every rank of ``group`` maps (share_weights_between_ranks)
    and ``input_`` this rank's part of them, written in place: then the gather has nothing to move."""
    entry = _shared_weights.get(output.untyped_storage().data_ptr())
    if entry is None:
        return False
    flat, shared_with = entry[0](), entry[1]
    if (flat is None or shared_with is not group or flat.data_ptr() != output.data_ptr()
            or flat.numel() != output.numel() or input_.untyped_storage().data_ptr() != flat.data_ptr()):
        return False
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return output.numel() == world * input_.numel() and input_.data_ptr() == output[rank * input_.numel():].data_ptr()


def _offset_in(flat: torch.Tensor, view: torch.Tensor) -> int:
    """Where ``view`` (a view into ``flat``'s storage, of its dtype) starts in ``flat``, in elements."""
    return (view.data_ptr() - flat.data_ptr()) // flat.element_size()


def share_weights_between_ranks(zero_optimizer: Any) -> bool:
    """Keep ZeRO-1/2's flat weights in one shared-memory segment that every rank of a machine maps.

    After each step, ZeRO gathers every rank's updated part of the weights into every rank: 96 MB moved
    per step for the 2+2-layer Transformer on 2 ranks (about 30 ms through shared memory). Where the flat
    weights themselves are shared, each rank's optimizer updates its part in place, and the gather is a
    barrier. No rank reads another's part while it changes: the update follows the gradient reduction,
    which every rank enters only once its backward pass is done, and the barrier follows the update.

    For float32 weights that the optimizer updates in place (share_master_weights), on gloo between ranks
    of one machine, without overlap_comm, and not with AMI_DIST_SHM_COLLECTIVES=0. Returns whether any
    group's weights are now shared; a collective on each group's ranks (all of them decide alike).
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if (not isinstance(zero_optimizer, DeepSpeedZeroOptimizer) or zero_optimizer.cpu_offload
            or zero_optimizer.overlap_comm or os.environ.get(SHM_ENV, "1") == "0"):
        return False
    shared_any = False
    for i, flat in enumerate(zero_optimizer.bit16_groups_flat):
        group = zero_optimizer.real_dp_process_group[i]
        master = zero_optimizer.single_partition_of_fp32_groups[i]
        if (dist.get_backend(group) != "gloo" or flat.device.type != "cpu" or not flat.is_contiguous()
                or master.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()):
            continue
        shared = shared_tensor(group, flat.numel(), flat.dtype)
        if shared is None:
            continue
        rank = dist.get_rank(group)
        own = zero_optimizer.parallel_partitioned_bit16_groups[i][rank]
        start = _offset_in(flat, own)
        shared[start:start + own.numel()].copy_(own)
        dist.barrier(group=group)  # every part written
        flat.data = shared
        zero_optimizer._update_model_bit16_weights(i)
        partitions = zero_optimizer.get_data_parallel_partitions(flat, i)
        zero_optimizer.parallel_partitioned_bit16_groups[i] = partitions
        master.data = partitions[rank].data  # the optimizer's parameter object, now in the segment
        _shared_weights[shared.untyped_storage().data_ptr()] = (weakref.ref(flat), group)
        shared_any = True
    if shared_any:
        zero_optimizer._link_all_hp_params()
    return shared_any


def _shm_reduce_in_place(optimizer: Any, bucket: list[torch.Tensor], communication_data_type: torch.dtype,
                         divide: bool, process_group: Any) -> bool:
    """All-reduce a ZeRO-1/2 gradient bucket in place through shared memory (ZeRO-2: reduce-scatter it, each
    rank summing only its own partition), or not at all on one rank;
    False (nothing done) where the bucket or its group cannot go that way, or where DeepSpeed keeps
    float32 gradient partitions of a lower-precision model (its ``output_bucket``: set on the owning rank
    only). Every rank decides alike: the tests are on the configuration, the same on every rank."""
    group = optimizer.dp_process_group if process_group is None else process_group
    if not is_gloo_cpu(group, bucket):
        return False
    accumulation_dtype = getattr(optimizer, "gradient_accumulation_dtype", None)
    eligible = (not getattr(optimizer, "overlap_comm", True) and getattr(optimizer, "sequence_parallel_size", 0) == 1
                and (accumulation_dtype != torch.float32 or accumulation_dtype == optimizer.dtype)
                and all(t.dtype == communication_data_type and t.is_contiguous() for t in bucket))
    if not eligible:
        return False
    world = dist.get_world_size(group)
    if world == 1:
        return True  # the sum over one rank is its own gradients, and their average divides by 1
    shm = shared_memory_group(group)
    if shm is None:
        return False
    divide_by = world if divide and optimizer.gradient_average else None
    shares = _shares_by_partition(optimizer, bucket, group, world)
    if shares is not None:
        shm.reduce_scatter_(shares, divide_by=divide_by)
    else:
        shm.all_reduce_(bucket, divide_by=divide_by)
    return True


def _shares_by_partition(optimizer: Any, bucket: list[torch.Tensor], group: Any,
                         world: int) -> list[list[torch.Tensor]] | None:
    """A ZeRO-2 gradient bucket cut where ZeRO partitions the weights: ``shares[k]`` are the parts of the
    gradients whose weights rank k updates; None where that cannot be told (then the bucket is all-reduced).

    ZeRO-2 keeps, of each gradient, only the part in this rank's partition of its group's flat weights
    (get_flat_partition) and frees the rest, so the others' sums need not reach it: a reduce-scatter does,
    at half the traffic. Where a gradient lies in the flat weights follows from its parameter, a view into
    them; the bucket's gradients are those DeepSpeed queued with their parameters (its ipg_buckets).
    """
    if not getattr(optimizer, "partition_gradients", False):
        return None  # ZeRO-1 keeps whole gradients until its step
    queued: dict[int, tuple[int, int]] = {}
    for ipg in getattr(optimizer, "ipg_buckets", {}).values():
        for grad, (group_index, index_in_group, _) in zip(ipg.grads, ipg.params, strict=False):
            queued[id(grad)] = (group_index, index_in_group)
    shares: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for grad in bucket:
        if id(grad) not in queued:
            return None
        group_index, index_in_group = queued[id(grad)]
        param = optimizer.bit16_groups[group_index][index_in_group]
        flat = optimizer.bit16_groups_flat[group_index]
        partitions = optimizer.parallel_partitioned_bit16_groups[group_index]
        if (optimizer.real_dp_process_group[group_index] is not group or len(partitions) != world
                or grad.numel() != param.numel() or not param.is_contiguous()
                or param.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()):
            return None
        start = _offset_in(flat, param)
        end = start + param.numel()
        for owner, partition in enumerate(partitions):
            low = _offset_in(flat, partition)
            a, b = max(start, low), min(end, low + partition.numel())
            if a < b:
                shares[owner].append(grad.view(-1)[a - start:b - start])
    return shares


def _allreduce_and_copy(self: Any, small_bucket: list[torch.Tensor], communication_data_type: torch.dtype,
                        rank: int | None = None, log: Any = None, divide: bool = True, process_group: Any = None,
                        **rest: Any) -> None:
    """The parameters of DeepSpeedZeroOptimizer.allreduce_and_copy this adapter reads."""


def _gradient_all_reduce(a: dict[str, Any]) -> Any:
    """ZeRO-1/2's all-reduce of a gradient bucket (``allreduce_and_copy``), through shared memory where
    the ranks share a machine.

    DeepSpeed flattens the bucket's gradients into a new tensor, divides it, all-reduces it and copies
    it back into the gradients: four passes over every gradient plus gloo's socket (on 1 rank too, where
    it is 64 ms of the dialog LSTM's step for nothing). The shared-memory all-reduce reads the gradients
    in place, chunk by chunk, and writes the averaged sums back; 1 rank skips it.
    """
    if a["rank"] is not None or not _shm_reduce_in_place(a["self"], a["small_bucket"], a["communication_data_type"],
                                                         a["divide"], a["process_group"]):
        return NOT_HANDLED
    return None


def _allreduce_and_copy_with_multiple_ranks(self: Any, small_bucket: list[torch.Tensor],
                                            communication_data_type: torch.dtype, log: Any = None,
                                            divide: bool = True, process_group: Any = None, **rest: Any) -> None:
    """The parameters of DeepSpeedZeroOptimizer.allreduce_and_copy_with_multiple_ranks this adapter reads."""


def _bucket_all_reduce(a: dict[str, Any]) -> Any:
    """The same for the contiguous-gradients path (``allreduce_and_copy_with_multiple_ranks``), which
    all-reduces a bucket of slices and keeps the result only in the slices this rank owns: the others
    get the reduced values too, where DeepSpeed leaves them as they were; nothing reads them again."""
    if not _shm_reduce_in_place(a["self"], a["small_bucket"], a["communication_data_type"], a["divide"],
                                a["process_group"]):
        return NOT_HANDLED
    return None


def sum_of_squares(grad: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Σ grad² as a float64 scalar, read in the gradient's own precision: the float32 norms of rows of
    ``block`` elements, their squares summed in float64. Within float32 rounding (a few 1e-8; DeepSpeed
    rounds its total to float32 too) of converting the gradient to float64 first, DeepSpeed's way, and
    no drift with size (one float32 norm over millions of elements is off by ~1e-5); without the
    converted copy, and about 7× faster on one thread."""
    flat = grad.reshape(-1)
    whole = flat.numel() // block * block
    total = torch.linalg.vector_norm(flat[:whole].view(-1, block), dim=1).double().square().sum()
    if whole < flat.numel():
        total = total + flat[whole:].double().square().sum()
    return total


def _get_grad_norm_direct(self: Any, gradients: list[torch.Tensor], params: list[Any], norm_type: float = 2) -> None:
    """The parameters of DeepSpeedZeroOptimizer.get_grad_norm_direct this adapter reads."""


def _blockwise_grad_norm(a: dict[str, Any]) -> Any:
    """ZeRO-1/2's gradient 2-norm (for clipping), with :func:`sum_of_squares` for each gradient.

    DeepSpeed converts every gradient of the rank's partition to float64 before taking its norm: for
    the dialog LSTM a 76 MB copy on 1 rank, and 12-26 ms per step. Float32 gradients on CPU, on gloo,
    without model or pipeline parallelism take this path; anything else, DeepSpeed's.
    """
    from deepspeed.runtime.zero import stage_1_and_2 as zero

    self, gradients, params = a["self"], a["gradients"], a["params"]
    if (not is_gloo_cpu(self.dp_process_group, gradients) or float(a["norm_type"]) != 2.0
            or any(g.dtype != torch.float32 for g in gradients) or getattr(self, "model_parallel_rank", 1) != 0
            or any(getattr(p, "ds_pipe_replicated", False) for p in params)):
        return NOT_HANDLED
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)][:len(params)]
    squares = torch.zeros((), dtype=torch.float64)
    for grad in grads:
        squares += sum_of_squares(grad.detach())
    total = squares.float()
    zero.dist.all_reduce(total, op=zero.dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=zero.dist.ReduceOp.SUM)
    total = total.pow(0.5)
    zero.mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def flatten_releasing(tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
    """``torch.cat`` of the flattened ``tensors``, zero-padded to ``numel`` elements, that lets go of each
    input once it is copied: its entry in ``tensors`` becomes a view of the result. Where the list held
    the only reference, the inputs are freed as the result fills, so the two never coexist in full."""
    out = torch.empty(numel, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for index in range(len(tensors)):
        size = tensors[index].numel()
        piece = out.narrow(0, offset, size)
        piece.copy_(tensors[index].reshape(-1))
        tensors[index] = piece.view_as(tensors[index])
        offset += size
    out.narrow(0, offset, numel - offset).zero_()
    return out


def release_gradients_when_flattened(zero_optimizer: Any) -> None:
    """Make a ZeRO-1/2 optimizer free its gradients while it flattens them for the step.

    At each step DeepSpeed copies this rank's gradients into one flat tensor for the optimizer, while its
    list of them still holds every one, so the step needs the gradients twice over (96 MB more for the
    Transformer, 76 MB for the LSTM, on one rank), and the step is where the peak resident set is set.
    Flattening that list (and only it: it is recognised by identity) now goes through flatten_releasing.
    """

    def is_gradient_list(tensors: Any) -> bool:
        lists = getattr(zero_optimizer, "averaged_gradients", None) or {}
        return (type(tensors) is list and len(tensors) > 0 and any(tensors is g for g in lists.values())
                and all(t.device.type == "cpu" for t in tensors))

    def flatten(tensors: Any) -> None:
        """The parameters of DeepSpeedZeroOptimizer.flatten this adapter reads."""

    def flatten_aligned(tensor_list: Any, alignment: int, use_cpu_data: bool = False,
                        param_padding: Any = None) -> None:
        """The parameters of DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned this adapter reads."""

    def releasing(a: dict[str, Any]) -> Any:
        if not is_gradient_list(a["tensors"]):
            return NOT_HANDLED
        return flatten_releasing(a["tensors"], sum(t.numel() for t in a["tensors"]))

    def releasing_aligned(a: dict[str, Any]) -> Any:
        if a["use_cpu_data"] or a["param_padding"] is not None or not is_gradient_list(a["tensor_list"]):
            return NOT_HANDLED
        numel = sum(t.numel() for t in a["tensor_list"])
        return flatten_releasing(a["tensor_list"], -(-numel // a["alignment"]) * a["alignment"])

    zero_optimizer.flatten = wrap(zero_optimizer.flatten, flatten, releasing)
    zero_optimizer.flatten_dense_tensors_aligned = wrap(zero_optimizer.flatten_dense_tensors_aligned,
                                                        flatten_aligned, releasing_aligned)


def share_master_weights(zero_optimizer: Any) -> bool:
    """Let ZeRO-1/2 update this rank's slice of the model's weights in place when they are float32 on CPU.

    ZeRO keeps a "master" copy of the rank's slice in float32 for the optimizer and copies it back into
    the (usually half-precision) weights after each step. For a float32 model that copy is the same
    numbers twice: 76 MB for the dialog LSTM on one rank. Here the master slice becomes a view of the
    model's own slice (the copy back is then a copy onto itself), and DeepSpeed's links from each weight
    to its master fragment are rebuilt. Gloo groups and CPU tensors only; returns whether anything was shared.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer) or zero_optimizer.cpu_offload:
        return False
    pairs = []
    for i, master in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        group = zero_optimizer.real_dp_process_group[i]
        rank = dist.get_rank(group=group)
        own = zero_optimizer.parallel_partitioned_bit16_groups[i][rank]
        if (not is_gloo_cpu(group, [master, own])
                or (own.dtype, own.device, own.shape) != (master.dtype, master.device, master.shape)):
            return False
        pairs.append((master, own))
    for master, own in pairs:
        master.data = own.data  # same tensor object (the optimizer's parameter), the model's storage
    zero_optimizer._link_all_hp_params()
    return True


def _create_fp32_partitions(self: Any) -> None:
    """The parameters of DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions this adapter reads."""


def _stage3_master_shared(original: Callable[..., Any]) -> Callable[..., Any]:
    """ZeRO-3's float32 master partition, the rank's own partition of the weights where they are float32 on CPU.

    DeepSpeed means to do this itself: where the partition's dtype and device are the master's, it uses the
    partition as the master (no copy). On CPU it compares the partition's ``torch.device`` with its own device
    name, a string, which never matches, and makes a second float32 copy of every partition (346 MB per
    network at one rank on the paper's NMT LSTM). Here the comparison is made with the device as a
    ``torch.device`` while DeepSpeed creates the master partitions.
    """

    def handle(a: dict[str, Any]) -> Any:
        self = a["self"]
        if not isinstance(self.device, str) or not is_gloo_cpu(self.dp_process_group, []):
            return NOT_HANDLED
        name = self.device
        self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    return wrap(original, _create_fp32_partitions, handle)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 4 << 20


def return_large_frees_to_the_system() -> bool:
    """Have glibc serve every allocation of 4 MiB or more with its own mapping, returned to the system when freed.

    ZeRO-3 gathers each parameter whole before it is used and frees it after, several times per step. glibc
    serves those from its heap once it has seen a large block freed (its mmap threshold rises up to 32 MiB),
    and the heap keeps what is freed: on the paper's NMT LSTM at 4 ranks, 2.1 GB resident per rank after three
    steps, of which malloc_trim() hands back 1 GB; with the threshold held at 4 MiB, 1.1 GB
    (benchmarks/zero_memory.py). Process-wide and for ZeRO-3 only (ZeRO-1/2 allocate their buffers once).
    False where the C library has no mallopt (not glibc)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


Build = Callable[[Callable[..., Any]], Callable[..., Any]]  # DeepSpeed's method -> the method put in its place


def _handled_by(understood: Callable[..., Any], handle: Callable[[dict[str, Any]], Any]) -> Build:
    return functools.partial(wrap, understood=understood, handle=handle)


# name: (class, method, the parameters read, how its replacement is built), installed by install_zero_cpu
def _class_adaptations() -> dict[str, list[tuple[Any, str, Callable[..., Any], Build]]]:
    import deepspeed.comm.torch  # noqa: F401  (the attribute deepspeed.comm.torch is PyTorch itself)
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Zero3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    backend = sys.modules["deepspeed.comm.torch"].TorchBackend
    return {
        "shm_all_gather": [(backend, "all_gather_into_tensor", _all_gather_into_tensor,
                            _handled_by(_all_gather_into_tensor, _fast_all_gather))],
        "shm_gradient_reduce": [(Zero, "allreduce_and_copy", _allreduce_and_copy,
                                 _handled_by(_allreduce_and_copy, _gradient_all_reduce)),
                                (Zero, "allreduce_and_copy_with_multiple_ranks",
                                 _allreduce_and_copy_with_multiple_ranks,
                                 _handled_by(_allreduce_and_copy_with_multiple_ranks, _bucket_all_reduce))],
        "blockwise_grad_norm": [(Zero, "get_grad_norm_direct", _get_grad_norm_direct,
                                 _handled_by(_get_grad_norm_direct, _blockwise_grad_norm))],
        "stage3_shared_master_weights": [(Zero3, "_create_fp32_partitions", _create_fp32_partitions,
                                          _stage3_master_shared)],
    }


def install_zero_cpu() -> list[str]:
    """Put the collectives and the norm above in DeepSpeed's classes (once); the names of those in place.
    A method missing from this DeepSpeed, or one whose parameters no longer include those read, is left as is."""
    installed = []
    for name, changes in _class_adaptations().items():
        usable = []
        for cls, method, understood, build in changes:
            original = getattr(cls, method, None)
            if original is None:
                continue
            wanted = [p for p in inspect.signature(understood).parameters if p not in ("self", "rest")]
            have = inspect.signature(getattr(original, "ami_dist_original", original)).parameters
            if "args" not in have and not all(p in have for p in wanted):
                continue  # DeepSpeed's method changed: ours would read arguments it no longer takes
            usable.append((cls, method, build))
        if len(usable) != len(changes):
            continue
        for cls, method, build in usable:
            original = getattr(cls, method)
            if not getattr(original, "ami_dist_patched", False):
                setattr(cls, method, build(original))
        installed.append(name)
    return installed


def adapt_zero_optimizer(zero_optimizer: Any) -> list[str]:
    """The per-engine changes for a ZeRO-1/2 optimizer on CPU and gloo; the names of those applied.
    Sharing the flat weights is a collective on each group's ranks (all of them decide alike)."""
    if not share_master_weights(zero_optimizer):
        return []
    release_gradients_when_flattened(zero_optimizer)
    applied = ["shared_master_weights", "releasing_flatten"]
    if share_weights_between_ranks(zero_optimizer):
        applied.append("shared_flat_weights")
    return applied
