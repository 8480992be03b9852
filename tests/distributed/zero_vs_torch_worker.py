"""Worker for test_zero_matches_torch: a small LSTM trained for a few steps on 1 or 2 ranks under a ZeRO
preset must end with the weights that plain PyTorch reaches on one process with both ranks' batches
(the loss averaged over ranks, clipped, the same optimizer and schedule).

Run under torchrun with 1 or 2 ranks: ``zero_vs_torch_worker.py PRESET OPTIMIZER on|off`` (the DeepSpeed adapter);
prints one line of JSON.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from ami_dist.config.schema import OptimConfig, TrainConfig
from ami_dist.data.batching import make_batch
from ami_dist.distributed import build_engine, init_distributed, load_preset, resolve_ds_config
from ami_dist.distributed.comm import exit_worker
from ami_dist.distributed.deepspeed_adapter import adapter_params, patched_attributes
from ami_dist.distributed.deepspeed_adapter.zero_cpu import shared_memory_group, stats
from ami_dist.models import ModelConfig, build_model
from ami_dist.training.losses import token_nll
from ami_dist.training.optim import build_optimizer

PAD, BOS, EOS, VOCAB, STEPS = 0, 1, 2, 40, 4


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    lengths = torch.randint(3, 9, (6,), generator=g).tolist()
    src = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    tgt = [torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in lengths]
    return make_batch(src, tgt, PAD, BOS, EOS)


def loss_of(model, b) -> torch.Tensor:
    real = b.tgt_out != PAD
    total, ntok = token_nll(model(b.src, b.src_lengths, b.tgt_in, positions=real), b.tgt_out[real], PAD)
    return total / ntok


def main(preset: str, optimizer_name: str, adapter: bool) -> None:
    comm = init_distributed(60, 1, adapter)
    model_cfg = ModelConfig(emb_dim=16, hidden_size=16, enc_layers=1, dec_layers=1, dropout=0.0)
    optim_cfg = OptimConfig(name=optimizer_name, lr=0.5 if optimizer_name == "sgd" else 0.01, max_grad_norm=0.1)
    torch.manual_seed(3)
    model = build_model(model_cfg, VOCAB, PAD)
    reference = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    ref_opt, ref_sched = build_optimizer(list(reference.parameters()), optim_cfg, 16)
    opt, sched = build_optimizer(list(model.parameters()), optim_cfg, 16)
    world = comm.world_size
    ds_config = resolve_ds_config(load_preset(preset), preset, TrainConfig(batch_size=6 * world), optim_cfg, world)
    engine = build_engine(model, opt, sched, ds_config)
    reduced = []  # buckets all-reduced DeepSpeed's way (flattened, through gloo), not ami-dist's
    allreduce_bucket = engine.optimizer.allreduce_bucket
    engine.optimizer.allreduce_bucket = lambda bucket, *a, **k: reduced.append(len(bucket)) or allreduce_bucket(
        bucket, *a, **k)
    if comm.rank == 1:  # the last to update its part: rank 0 must not read it before it is done
        engine.optimizer.optimizer.register_step_pre_hook(lambda *_: time.sleep(0.2))
    master = engine.optimizer.single_partition_of_fp32_groups[0]
    flat = engine.optimizer.bit16_groups_flat[0]
    shared = flat.data_ptr() <= master.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
    norms = []
    for step in range(STEPS):
        engine.backward(loss_of(engine, batch(step, comm.rank)))
        engine.step()
        (sum(loss_of(reference, batch(step, r)) for r in range(world)) / world).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), optim_cfg.max_grad_norm).item())
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad(set_to_none=True)
    ours = dict(engine.module.named_parameters())
    worst = max((ours[n] - p).abs().max().item() for n, p in reference.named_parameters())
    moved = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), initial, strict=True))
    shm = shared_memory_group(engine.optimizer.dp_process_group)
    aligned_flatten = engine.optimizer.flatten_dense_tensors_aligned
    result = {"rank": comm.rank, "max_abs_diff": worst, "master_shares_model_storage": shared, "moved": moved,
              "clipped_steps": sum(n > optim_cfg.max_grad_norm for n in norms),
              "deepspeed_bucket_reductions": len(reduced),
              "shared_memory_calls": shm.calls if shm is not None else None,
              "gathers_in_place": stats["gathers_in_place"],
              "blockwise_norm": getattr(type(engine.optimizer).get_grad_norm_direct, "ami_dist_patched", False),
              "releasing_flatten": getattr(aligned_flatten, "ami_dist_patched", False),
              "patched": patched_attributes(engine.optimizer), "params": adapter_params()}
    sys.stdout.write(json.dumps(result) + "\n")  # one write: the ranks share the pipe
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "on")
    exit_worker()  # see its docstring: no abort at teardown after the work is done
