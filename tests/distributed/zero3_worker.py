"""Worker for test_zero3: on 1 or 2 ranks, a small LSTM built for ZeRO-3 (distributed.engines.construct_model:
under deepspeed.zero.Init, initialised one gathered parameter at a time) must start from the weights a plain
construction gives with the same seed, hold only its partitions from the start, and train to the weights
plain PyTorch reaches with every rank's batch.

With the adapter on (CPU, gloo), the rank's flat gradient buffer must be held only from a backward pass to the
end of the step, and the optimizer must step on views of it (deepspeed_adapter.zero3_gradients); with ACCUM
micro-batches per step, the gradients accumulate across them.

Run under torchrun: ``zero3_worker.py OPTIMIZER FAMILY [ACCUM]``; prints one line of JSON per rank.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from zero_vs_torch_worker import PAD, STEPS, VOCAB, batch, loss_of  # beside this file

from ami_dist.config.schema import OptimConfig, TrainConfig
from ami_dist.distributed import (
    build_engine,
    full_parameters,
    init_distributed,
    load_preset,
    resolve_ds_config,
)
from ami_dist.distributed.comm import exit_worker
from ami_dist.distributed.deepspeed_adapter import adapter_params
from ami_dist.distributed.engines import construct_model
from ami_dist.models import ModelConfig, build_model
from ami_dist.training.optim import build_optimizer


def main(optimizer_name: str, family: str, accum: int) -> None:
    comm = init_distributed(60, 1)
    extra = {"heads": 2, "ffn_size": 32} if family == "transformer" else {}
    model_cfg = ModelConfig(family=family, emb_dim=16, hidden_size=16, enc_layers=1, dec_layers=1, dropout=0.0,
                            **extra)
    optim_cfg = OptimConfig(name=optimizer_name, lr=0.5 if optimizer_name == "sgd" else 0.01, max_grad_norm=0.1)
    world = comm.world_size
    preset = load_preset("configs/ds_zero3.json")
    preset["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    ds_config = resolve_ds_config(preset, "configs/ds_zero3.json",
                                  TrainConfig(batch_size=6 * world * accum, grad_accum=accum), optim_cfg, world)
    torch.manual_seed(3)
    reference = build_model(model_cfg, VOCAB, PAD)
    after_plain = torch.rand(1).item()
    torch.manual_seed(3)
    model = construct_model(lambda init: build_model(model_cfg, VOCAB, PAD, init), ds_config)
    after_zero3 = torch.rand(1).item()
    partitioned = all(p.numel() == 0 and p.ds_tensor.numel() <= -(-p.ds_numel // world) for p in model.parameters())
    largest = max(p.numel() for p in reference.parameters())
    opt, sched = build_optimizer(list(model.parameters()), optim_cfg, 16)
    engine = build_engine(model, opt, sched, ds_config)
    start = full_parameters(engine)
    init_diff = max((start[n] - p.detach()).abs().max().item() for n, p in reference.named_parameters())
    initial = copy.deepcopy(reference)
    ref_opt, ref_sched = build_optimizer(list(reference.parameters()), optim_cfg, 16)
    zero = engine.optimizer
    full = sum(p.partition_numel() for group in zero.fp16_groups for p in group)
    held = {"built": zero.grad_partitions_flat_buffer.numel(), "after_backward": [], "after_step": [],
            "step_on_views": []}

    def on_views(optimizer, args, kwargs) -> None:  # the optimizer's gradients, views of the flat buffer
        flat = zero.grad_partitions_flat_buffer.untyped_storage().data_ptr()
        held["step_on_views"].append(all(p.grad.untyped_storage().data_ptr() == flat
                                         for g in optimizer.param_groups for p in g["params"]))

    zero.optimizer.register_step_pre_hook(on_views)
    for step in range(STEPS):
        for micro in range(accum):
            engine.backward(loss_of(engine, batch(accum * step + micro, comm.rank)))
            held["after_backward"].append(zero.grad_partitions_flat_buffer.numel())
            engine.step()
        held["after_step"].append(zero.grad_partitions_flat_buffer.numel())
        (sum(loss_of(reference, batch(accum * step + micro, r)) for r in range(world) for micro in range(accum))
         / (world * accum)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), optim_cfg.max_grad_norm)
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad(set_to_none=True)
    ours = full_parameters(engine)
    shared = all(m.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
                 for m, w in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat, strict=True))
    result = {
        "rank": comm.rank, "init_max_abs_diff": init_diff, "same_rng_after": after_plain == after_zero3,
        "partitioned_from_construction": partitioned,
        "max_abs_diff": max((ours[n] - p.detach()).abs().max().item() for n, p in reference.named_parameters()),
        "moved": max((p - q).abs().max().item() for p, q in zip(reference.parameters(), initial.parameters(),
                                                                strict=True)),
        "master_shares_weights": shared, "adapter": adapter_params()["deepspeed_adapter"],
        "reduce_bucket_size": ds_config["zero_optimization"]["reduce_bucket_size"], "largest_param": largest,
        "gradient_buffer": held, "partition_numel": full, "steps": STEPS,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    exit_worker()  # see its docstring: no abort at teardown after the work is done
