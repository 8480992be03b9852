"""ZeRO-3 on CPU: the rank's gradient partitions held from its backward pass to the end of its step, not always.

DeepSpeed's ZeRO-3 optimizer allocates one flat float32 buffer for the gradient partitions of all its
parameters when it is built and keeps it for the life of the engine; ZeRO-1/2 hold gradients only between
a backward pass and the step. On one rank, where ZeRO-3 partitions nothing, that buffer is the whole
network's gradients, held while the other networks of the AMI schedule train and while nothing trains at
all (346 MB per network of the paper's NMT LSTM): ZeRO-3 then sat above ZeRO-2 in resident memory
(benchmarks/zero_memory.py). Here the buffer is let go after each step and made again, zeroed as
DeepSpeed makes it, before the next backward pass writes into it. Within the step the sub-group's
gradients are handed to the optimizer as a view of that buffer, where DeepSpeed copies them into one more
flat tensor first.

Gloo and CPU tensors only; an optimizer that offloads, or a DeepSpeed whose optimizer lacks what is read
here, is left as it is. Every wrapper takes ``*args, **kwargs`` and passes them on untouched.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ami_dist.distributed.deepspeed_adapter.zero_cpu import NOT_HANDLED, _offset_in, is_gloo_cpu, wrap

# DeepSpeedZeroOptimizer_Stage3's map from a parameter's ds_id to its view of the flat gradient buffer
VIEWS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"
WRAPPED = ("step", "partition_grads", "independent_gradient_partition_epilogue", "flatten")


def _any_call(*args: Any, **kwargs: Any) -> None:
    """The parameters read of the wrapped methods that only need to know they are called: none."""


def _flatten(tensors: Any) -> None:
    """The parameters of DeepSpeedZeroOptimizer_Stage3.flatten this adapter reads."""


def consecutive_view(flat: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``flat.narrow`` covering ``tensors`` when they are contiguous views of ``flat``, one after the other
    with nothing between them (what torch.cat of their flattened selves would equal); None otherwise."""
    if not tensors or flat.numel() == 0 or not flat.is_contiguous():
        return None
    storage = flat.untyped_storage().data_ptr()
    start = offset = _offset_in(flat, tensors[0])
    for t in tensors:
        if (t.dtype != flat.dtype or t.device != flat.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage or _offset_in(flat, t) != offset):
            return None
        offset += t.numel()
    if start < 0 or offset > flat.numel():
        return None
    return flat.narrow(0, start, offset - start)


def hold_gradients_for_the_step(optimizer: Any) -> bool:
    """Make a ZeRO-3 ``optimizer`` (gloo, CPU, no offload) hold its flat gradient buffer only between a
    backward pass and the end of the step, and step on views of it; whether it applied."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if (not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) or optimizer.offload_optimizer
            or getattr(optimizer, "offload_param", False) or not isinstance(getattr(optimizer, VIEWS, None), dict)
            or not all(hasattr(optimizer, name) for name in (*WRAPPED, "grad_partitions_flat_buffer",
                                                              "averaged_gradients", "fp16_groups"))):
        return False
    buffer = optimizer.grad_partitions_flat_buffer
    if not isinstance(buffer, torch.Tensor) or not is_gloo_cpu(optimizer.dp_process_group, [buffer]):
        return False
    params = list(itertools.chain.from_iterable(optimizer.fp16_groups))
    sizes = [p.partition_numel() for p in params]
    numel, dtype, device = sum(sizes), buffer.dtype, buffer.device
    if numel == 0 or buffer.numel() != numel:
        return False

    def held() -> bool:
        return optimizer.grad_partitions_flat_buffer.numel() == numel

    def hold(a: dict[str, Any]) -> Any:
        if not held():
            flat = torch.zeros(numel, dtype=dtype, device=device)
            views = getattr(optimizer, VIEWS)
            for param, view in zip(params, flat.split(sizes), strict=True):
                views[param.ds_id] = view
            optimizer.grad_partitions_flat_buffer = flat
        return NOT_HANDLED

    def release() -> None:
        getattr(optimizer, VIEWS).clear()
        optimizer.averaged_gradients = {}
        optimizer.grad_partitions_flat_buffer = torch.empty(0, dtype=dtype, device=device)

    def step_then_release(a: dict[str, Any]) -> Any:
        try:
            return original_step(*a["args"], **a["kwargs"])
        finally:
            release()

    def view_of_buffer(a: dict[str, Any]) -> Any:
        tensors = a["tensors"]
        if not held() or not any(tensors is g for g in optimizer.averaged_gradients.values()):
            return NOT_HANDLED
        view = consecutive_view(optimizer.grad_partitions_flat_buffer, tensors)
        return NOT_HANDLED if view is None else view

    original_step = optimizer.step
    optimizer.step = wrap(original_step, _any_call, step_then_release)
    optimizer.partition_grads = wrap(optimizer.partition_grads, _any_call, hold)
    optimizer.independent_gradient_partition_epilogue = wrap(
        optimizer.independent_gradient_partition_epilogue, _any_call, hold)
    optimizer.flatten = wrap(optimizer.flatten, _flatten, view_of_buffer)
    release()  # built, no gradients yet: the first backward pass makes the buffer
    return True
