"""Assemble a run: run directory, shared vocabulary, encoded data, one DeepSpeed engine per network."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ami_dist.config import Config, flatten, save_config, to_dict
from ami_dist.data.batching import ShardedBucketSampler
from ami_dist.data.corpus import Split
from ami_dist.data.prepared import open_prepared, sha256_file
from ami_dist.data.vocab import Vocab, vocab_sha256
from ami_dist.distributed import Comm, build_engine, load_preset, resolve_ds_config
from ami_dist.distributed.deepspeed_adapter import adapter_params
from ami_dist.distributed.engines import construct_model, load_module_weights, micro_batch_size, zero_stage
from ami_dist.errors import UserError
from ami_dist.models import build_model
from ami_dist.models.noise import NoiseNetwork
from ami_dist.run_dir import RunDir
from ami_dist.tracking import Tracker
from ami_dist.training.context import Network, Run
from ami_dist.training.guard import StepGuard
from ami_dist.training.optim import build_optimizer
from ami_dist.training.phases import make_stream
from ami_dist.training.schedule import Schedule


def make_run_dir(cfg: Config, comm: Comm) -> Path:
    """``<output_dir>/<name>-<time>`` chosen by rank 0 and shared, created with the resolved config in it."""

    def create() -> str:
        base = Path(cfg.run.output_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        save_config(cfg, RunDir(path).config)
        return str(path)

    return Path(comm.on_main(create))


def save_vocab(cfg: Config, comm: Comm, vocab: Vocab, run_dir: Path) -> None:
    """The run directory keeps the vocabulary its checkpoints are in; a continuing run must still have it."""

    def save() -> None:
        path = RunDir(run_dir).vocab(vocab.kind)
        if path.is_file():
            saved, prepared = sha256_file(path), vocab_sha256(vocab)
            if saved != prepared:
                raise UserError(f"{path}: sha256 {saved[:12]}, but the prepared data the run continues on is "
                                f"encoded with {prepared[:12]}")
            return
        path.write_bytes(vocab.to_bytes())

    comm.on_main(save)


def build_network(name: str, short: str, seed: int, cfg: Config, vocab: Vocab, ds_config: dict, train: Split,
                  valid: Split) -> Network:
    # Every rank builds the same initial weights from the seed; under ZeRO-3 each keeps its partitions only.
    torch.manual_seed(seed)
    model = construct_model(lambda initialise: build_model(cfg.model, len(vocab), vocab.pad_id, initialise), ds_config)
    optimizer, scheduler = build_optimizer(list(model.parameters()), cfg.optim, cfg.model.hidden_size,
                                           cfg.ami.adv_lr if cfg.ami.enabled else 0.0)
    return Network(name, short, build_engine(model, optimizer, scheduler, ds_config), train, valid)


def resolve_deepspeed(cfg: Config, preset_path: str, world_size: int) -> dict[str, dict]:
    """The DeepSpeed config of each network's engine (checked before any rank starts working)."""
    preset = load_preset(preset_path)
    seq2seq = resolve_ds_config(preset, preset_path, cfg.train, cfg.optim, world_size)
    configs = {"forward": seq2seq, "backward": seq2seq}
    if cfg.ami.enabled:
        configs["noise"] = resolve_ds_config(preset, preset_path, cfg.train, cfg.noise_optim, world_size)
    return configs


def build_schedule(cfg: Config) -> Schedule:
    ami = cfg.ami
    if not ami.enabled:
        return Schedule(cfg.train.mle_steps, 0, 0, 0, 0, 0)
    return Schedule(cfg.train.mle_steps, ami.noise_pretrain_steps, ami.noise_steps, ami.forward_steps,
                    ami.backward_steps, ami.cycles)


def build_run(cfg: Config, comm: Comm, run_dir: Path, tracker: Tracker, ds_configs: dict[str, dict],
              preset_path: str, prepared_dir: Path) -> Run:
    data = open_prepared(prepared_dir)  # every rank maps the same files; no text, no token lists
    vocab, train, valid = data.vocab, data.train, data.valid
    save_vocab(cfg, comm, vocab, run_dir)
    micro = micro_batch_size(cfg.train.batch_size, comm.world_size, cfg.train.grad_accum)
    sampler = ShardedBucketSampler(train.src_ids.lengths(), train.tgt_ids.lengths(), micro,
                                   rank=comm.rank, world=comm.world_size, seed=cfg.run.seed,
                                   bucket_batches=cfg.train.bucket_batches, batch_tokens=cfg.train.batch_tokens)
    networks = [
        build_network("forward", "fw", cfg.run.seed, cfg, vocab, ds_configs["forward"], train, valid),
        build_network("backward", "bw", cfg.run.seed + 1, cfg, vocab, ds_configs["backward"], train.reversed(),
                      valid.reversed()),
    ]
    for net, init in zip(networks, (cfg.ami.init_forward, cfg.ami.init_backward), strict=True):
        if init is not None:
            load_module_weights(net.engine, init)
    noise = None
    if cfg.ami.enabled:
        torch.manual_seed(cfg.run.seed + 2)
        model = construct_model(lambda _: NoiseNetwork(cfg.model.hidden_size, cfg.ami.noise_inner_size
                                                       or cfg.model.hidden_size), ds_configs["noise"])
        optimizer, scheduler = build_optimizer(list(model.parameters()), cfg.noise_optim, cfg.model.hidden_size)
        noise = build_engine(model, optimizer, scheduler, ds_configs["noise"])
    guard = StepGuard(cfg.train.max_bad_steps, comm.rank, cfg.fault.nan_loss_steps, cfg.fault.nan_grad_steps,
                      cfg.fault.rank)
    run = Run(cfg, comm, run_dir, vocab, networks, sampler, tracker, build_schedule(cfg), guard, noise=noise,
              stream=make_stream(cfg.run.seed, comm.rank))
    if comm.is_main:
        for name, ds_config in ds_configs.items():
            path = run_dir / f"deepspeed_{name}.json"
            path.write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")
            tracker.log_artifact(path, "config")
        tracker.log_artifact(RunDir(run_dir).config, "config")
        tracker.log_artifact(RunDir(run_dir).vocab(cfg.vocab.kind), "vocab")
        params = flatten(to_dict(cfg))
        # ZeRO-3 leaves each rank a shard; ds_numel is the whole parameter's size.
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in networks[0].engine.module.parameters())
        params.update({
            "deepspeed_config": preset_path,
            "zero_stage": zero_stage(ds_configs["forward"]),
            "world_size": comm.world_size,
            "micro_batch_size": micro,
            "vocab_size": len(vocab),
            "train_pairs": len(train),
            "train_pairs_dropped_too_long": sum(data.manifest["splits"]["train"]["dropped_too_long"].values()),
            "prepared_data": str(data.root),
            "vocab_sha256": data.vocab_sha256,
            "valid_pairs": len(valid),
            "params_per_network": n_params,
            "schedule_total_steps": run.schedule.total_steps,
            **adapter_params(),
        })
        tracker.log_params(params)
        tracker.log_inputs(dataset_inputs(data.manifest, {"train": len(train), "valid": len(valid)}))
    return run


def dataset_inputs(manifest: dict, pairs: dict[str, int]) -> list[dict]:
    """The training and validation data as MLflow dataset inputs: named for the corpus and split, with a digest
    of the files' contents (their sha256 in the prepared manifest) and of how they were read."""
    out = []
    for split, context in (("train", "training"), ("valid", "validation")):
        files = {key: entry for key, entry in manifest["inputs"].items() if key.startswith(split + "_")}
        if not files:  # a corpus prepared elsewhere and brought along without its raw files' record
            continue
        first = Path(next(iter(files.values()))["path"])
        digest = hashlib.sha256(json.dumps({"files": [e["sha256"] for e in files.values()],
                                            "settings": manifest["settings"]}, sort_keys=True).encode())
        out.append({"name": f"{first.parent.name}/{split}", "digest": digest.hexdigest()[:16], "context": context,
                    "source": {key: entry["path"] for key, entry in files.items()},
                    "profile": {"pairs": pairs[split], "bytes": sum(e["bytes"] for e in files.values()),
                                **{key: entry["sha256"] for key, entry in files.items()}}})
    return out
