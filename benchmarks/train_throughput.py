"""Target tokens/s of the MLE training step, against a plain PyTorch loop measured in the same run.

Each variant runs in its own process (so peak RSS is its own) on the same batches from the config's
training data, after warm-up steps:

  torch       plain PyTorch: forward, backward, clip, optimizer step (the reference)
  deepspeed   our MLE step (ami_dist.training.mle.mle_step) on a DeepSpeed engine, 1 rank
  deepspeed2  the same on 2 ranks (torchrun, gloo), ZeRO from the preset; tokens summed over ranks
  ami         the forward phase of AMI on 1 rank: the same batches once with MLE steps only and once with
              the adversarial update added (K noisy decodes as one K·B batch, the backward network's
              rewards, REINFORCE); prints the cost of the adversarial update in MLE steps

With --peer onmt, OpenNMT-py trains the same model on the same pairs in the same run
(benchmarks/peers/onmt.py, from its own virtualenv) and every row gets its ratio to the peer.

Then, against the DeepSpeed step: the time a step spends assembling its batch and, amortised, on the
MLflow log call made every train.log_every steps (and tokenisation, done once before training).

With --rounds N every variant (the peer included) runs N times, in turn, each round starting one variant
further along; the table then shows medians, each ratio taken within a round (variants that ran minutes
apart on a machine whose speed drifts are not compared), and the range of the ratio to the peer and of
peak RSS over the rounds.

Usage: python benchmarks/train_throughput.py [--config configs/dialog_lstm.yaml] [--steps 20] [--peer onmt]
       [--rounds 3]
Defaults: the paper's dialog LSTM (2 layers, 500 hidden, batch 64) on the bundled PersonaChat sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _vocab_and_pairs(cfg):
    """The training pairs as the config reads them and the vocabulary built from them."""
    from ami_dist.data.corpus import read_split
    from ami_dist.data.vocab import train_vocab

    pairs = read_split(cfg.data, "train")
    return train_vocab(cfg.vocab.kind, [s for s, _ in pairs] + [t for _, t in pairs], cfg.vocab.size), pairs


def _sampler(cfg, split, world: int, rank: int):
    """A rank's batches (index lists) of the encoded split, as training draws them."""
    from ami_dist.data.batching import ShardedBucketSampler
    from ami_dist.distributed.engines import micro_batch_size

    micro = micro_batch_size(cfg.train.batch_size, world, cfg.train.grad_accum)
    return iter(ShardedBucketSampler([len(s) for s in split.src_ids], [len(t) for t in split.tgt_ids], micro,
                                     rank=rank, world=world, seed=cfg.run.seed))


def _make_batch(split, vocab, indices: list[int]):
    from ami_dist.data.batching import make_batch

    return make_batch([split.src_ids[i] for i in indices], [split.tgt_ids[i] for i in indices], vocab.pad_id,
                      vocab.bos_id, vocab.eos_id)


def batch_indices(cfg, world: int, rank: int, count: int):
    """The vocabulary, the encoded training split and the first ``count`` batches (index lists) of a rank."""
    from ami_dist.data.corpus import encode_split

    vocab, pairs = _vocab_and_pairs(cfg)
    split, _ = encode_split(pairs, vocab, cfg.data.max_src_len, cfg.data.max_tgt_len)
    it = _sampler(cfg, split, world, rank)
    return vocab, split, [next(it) for _ in range(count)]


def _batches(cfg, world: int, rank: int, count: int):
    vocab, split, indices = batch_indices(cfg, world, rank, count)
    return vocab, [_make_batch(split, vocab, idx) for idx in indices]


def worker(variant: str, config: str, preset: str, steps: int, warmup: int, out: str) -> None:
    import torch

    from ami_dist.config import load_config
    from ami_dist.models import build_model
    from ami_dist.training.losses import token_nll
    from ami_dist.training.optim import build_optimizer

    cfg = load_config(config)
    if variant == "torch":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        rank, world = 0, 1
    else:
        from ami_dist.distributed import build_engine, init_distributed
        from ami_dist.training.build import resolve_deepspeed

        comm = init_distributed(cfg.distributed.timeout_s, cfg.train.threads_per_rank,
                                cfg.distributed.deepspeed_adapter)
        rank, world = comm.rank, comm.world_size
    vocab, batches = _batches(cfg, world, rank, warmup + steps)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(vocab), vocab.pad_id)
    optimizer, scheduler = build_optimizer(list(model.parameters()), cfg.optim, cfg.model.hidden_size)
    if variant == "torch":
        def step(batch) -> int:
            real = batch.tgt_out != vocab.pad_id
            logits = model(batch.src, batch.src_lengths, batch.tgt_in, positions=real)
            loss, ntok = token_nll(logits, batch.tgt_out[real], vocab.pad_id, cfg.train.label_smoothing)
            (loss / ntok).backward()
            if cfg.optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return int(ntok)
    else:
        from ami_dist.training.mle import mle_step

        engine = build_engine(model, optimizer, scheduler, resolve_deepspeed(cfg, preset, world)["forward"])

        def step(batch) -> int:  # the batch moves to the engine's device as the trainer's do (a no-op on CPU)
            return mle_step(engine, batch.to(engine.device), vocab.pad_id, cfg.train.label_smoothing)[1]

    for batch in batches[:warmup]:
        step(batch)
    tokens = src_tokens = 0
    started = time.perf_counter()
    for batch in batches[warmup:]:
        tokens += step(batch)
        src_tokens += int(batch.src_lengths.sum())
    elapsed = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = [float(tokens), float(src_tokens), elapsed, rss_mb]
    if variant != "torch":
        import torch.distributed as dist

        t = torch.tensor(result, dtype=torch.float64)
        dist.all_reduce(t[:2])  # tokens summed over ranks; time and RSS are per rank
        result = t.tolist()
    if rank == 0:
        Path(out).write_text(json.dumps({"tgt_tokens": result[0], "src_tokens": result[1], "seconds": result[2],
                                         "peak_rss_mb": result[3], "threads": torch.get_num_threads(),
                                         "world": world, "steps": steps, "gpu_peak_mb": _gpu_peak_mb()}))


def ami_worker(config: str, preset: str, steps: int, warmup: int, out: str) -> None:
    """Seconds for ``steps`` forward-phase batches without and with the adversarial update."""
    import tempfile

    import torch

    from ami_dist.config import load_config
    from ami_dist.data.prepare import ensure_prepared
    from ami_dist.distributed import init_distributed
    from ami_dist.tracking import NullTracker
    from ami_dist.training.build import build_run, make_run_dir, resolve_deepspeed
    from ami_dist.training.meter import Meter
    from ami_dist.training.phases import METRICS, forward_step

    cfg = load_config(config, ["ami.enabled=true"])
    comm = init_distributed(cfg.distributed.timeout_s, cfg.train.threads_per_rank,
                            cfg.distributed.deepspeed_adapter)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.output_dir = tmp
        run_dir = make_run_dir(cfg, comm)
        run = build_run(cfg, comm, run_dir, NullTracker(), resolve_deepspeed(cfg, preset, comm.world_size), preset,
                        ensure_prepared(cfg, show=False))
        batches = iter(run.sampler)
        indices = [next(batches) for _ in range(warmup + steps)]
        tgt = run.network("forward").train.tgt_ids
        tokens = sum(len(tgt[i]) + 1 for batch in indices[warmup:] for i in batch)
        meter = Meter(METRICS)
        seconds = {}
        for adversarial in (False, True):
            for batch in indices[:warmup]:
                forward_step(run, batch, adversarial, meter)
            started = time.perf_counter()
            for batch in indices[warmup:]:
                forward_step(run, batch, adversarial, meter)
            seconds[adversarial] = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"tgt_tokens": float(tokens), "mle_seconds": seconds[False],
                                     "both_seconds": seconds[True], "peak_rss_mb": rss_mb, "k": cfg.lns.k,
                                     "threads": torch.get_num_threads(), "steps": steps,
                                     "gpu_peak_mb": _gpu_peak_mb()}))


def _gpu_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def critical_path(cfg, batches: int = 200, calls: int = 20) -> dict:
    """What a training step does besides computing: assemble its batch (sampler indices -> padded tensors),
    and, every train.log_every steps, one MLflow log call (rank 0, the embedded sqlite store). Tokenisation
    happens once, before the first step (timed here too)."""
    import tempfile

    from ami_dist.data.corpus import encode_split
    from ami_dist.tracking import MlflowTracker

    vocab, pairs = _vocab_and_pairs(cfg)
    started = time.perf_counter()
    split, _ = encode_split(pairs, vocab, cfg.data.max_src_len, cfg.data.max_tgt_len)
    encode_s = time.perf_counter() - started
    sampler = _sampler(cfg, split, 1, 0)
    started = time.perf_counter()
    for _ in range(batches):
        _make_batch(split, vocab, next(sampler))
    batch_ms = 1000 * (time.perf_counter() - started) / batches
    metrics = {f"{net}/{name}": 1.0 for net in ("fw", "bw") for name in ("mle_nll", "lr", "adv_reward", "reward_std")}
    metrics |= {"train/tgt_tokens_per_s": 1.0, "train/skipped_updates": 0.0, "schedule/phase": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        tracker = MlflowTracker(f"sqlite:///{tmp}/mlflow.db", "bench", "bench")
        tracker.log_metrics(metrics, 0)  # the first call creates tables and caches
        started = time.perf_counter()
        for step in range(1, calls + 1):
            tracker.log_metrics(metrics, step * cfg.train.log_every)
        log_ms = 1000 * (time.perf_counter() - started) / calls
        tracker.finish()
    return {"encode_s": encode_s, "pairs": len(pairs), "batch_ms": batch_ms, "log_ms": log_ms,
            "log_every": cfg.train.log_every, "metrics": len(metrics)}


def run_variant(variant: str, args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "BENCH_THREADS": str(args.threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    me = [str(Path(__file__).resolve()), "--worker", variant, "--config", args.config, "--preset", args.preset,
          "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
    if variant == "ami":
        me[me.index("--worker") + 1] = "ami"
    if variant == "deepspeed2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29655", *me]
    else:
        cmd = [sys.executable, *me]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/dialog_lstm.yaml")
    parser.add_argument("--preset", default="configs/ds_zero2.json")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of the 1-rank variants")
    parser.add_argument("--variants", default="torch,deepspeed,deepspeed2,ami")
    parser.add_argument("--peer", choices=["onmt"], help="also run OpenNMT-py (benchmarks/peers/onmt.py)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, in turn; report medians and ranges")
    parser.add_argument("--no-critical-path", dest="critical_path", action="store_false",
                        help="skip timing batch assembly and MLflow logging against the step")
    parser.add_argument("--onmt_venv", default=os.environ.get("ONMT_VENV", "/tmp/onmt-venv"))
    parser.add_argument("--json", help="also write the first round's figures to this file (benchmarks/gpu_check.py)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "ami":
            ami_worker(args.config, args.preset, args.steps, args.warmup, args.out)
        else:
            worker(args.worker, args.config, args.preset, args.steps, args.warmup, args.out)
        if args.worker != "torch":
            from ami_dist.distributed.comm import exit_worker

            exit_worker()
        return
    import tempfile

    names = args.variants.split(",") + (["onmt"] if args.peer == "onmt" else [])
    peer_batches = None
    if args.peer == "onmt":
        from ami_dist.config import load_config

        cfg = load_config(args.config)
        _, split, indices = batch_indices(cfg, 1, 0, args.warmup + args.steps)  # the 1-rank variants' batches
        peer_batches = ([split.pairs[i] for batch in indices for i in batch], split.pairs, cfg)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            # Each round runs every variant once, starting one further along each time, so that a slowdown
            # of the machine in some part of a round does not always hit the same variant.
            order = names[index % len(names):] + names[:index % len(names)]
            results = {}
            for variant in order:
                print(f"round {index + 1}/{args.rounds}: running {variant} ...", flush=True)
                if variant == "onmt":
                    from peers.onmt import run_peer

                    assert peer_batches is not None
                    pairs, all_pairs, cfg = peer_batches
                    results["onmt"] = run_peer(Path(args.onmt_venv), cfg, pairs, all_pairs, args.steps, args.warmup,
                                               args.threads)
                else:
                    results[variant] = run_variant(variant, args, Path(tmp) / f"{variant}.json")
            ami = results.pop("ami", None)
            if ami is not None:  # its MLE-only pass is a row like the others
                results["ami_fw_mle"] = {**ami, "seconds": ami["mle_seconds"], "src_tokens": float("nan"), "world": 1}
                results["_ami"] = ami
            rounds.append(results)

    def rate(r: dict) -> float:
        return r["tgt_tokens"] / r["seconds"]

    def spread(values: list[float], fmt: str) -> str:
        return f"{min(values):{fmt}}-{max(values):{fmt}}" if len(values) > 1 else ""

    rows = [name for name in rounds[0] if name != "_ami"]
    print(f"\nMLE step throughput, config {args.config}, {args.steps} timed steps after {args.warmup} warm-up"
          + (f"; medians of {args.rounds} rounds, ratios taken within each round" if args.rounds > 1 else ""))
    ranges = f" {'vs onmt range':>13s} {'RSS range':>11s}" if args.rounds > 1 else ""
    print(f"{'variant':12s} {'ranks':>5s} {'thr/rank':>8s} {'tgt tok/s':>10s} {'ms/step':>8s} {'peak RSS MB':>11s} "
          f"{'vs torch':>8s} {'vs onmt':>8s}{ranges}")
    for name in rows:
        runs = [r[name] for r in rounds]
        first = runs[0]
        ms = statistics.median(1000 * r["seconds"] / r["steps"] for r in runs)
        rss = [r["peak_rss_mb"] for r in runs]
        vs_ref = [rate(r[name]) / rate(r["torch"]) for r in rounds] if "torch" in rounds[0] else []
        vs_peer = [rate(r[name]) / rate(r["onmt"]) for r in rounds] if "onmt" in rounds[0] else []
        line = (f"{name:12s} {first['world']:5d} {first['threads']:8d} {statistics.median(map(rate, runs)):10.0f} "
                f"{ms:8.1f} {statistics.median(rss):11.0f} "
                f"{f'{statistics.median(vs_ref):.2f}x' if vs_ref else '-':>8s} "
                f"{f'{statistics.median(vs_peer):.2f}x' if vs_peer else '-':>8s}")
        if args.rounds > 1:
            line += f" {spread(vs_peer, '.2f') if vs_peer else '-':>13s} {spread(rss, '.0f'):>11s}"
        print(line)
    ami_rounds = [r["_ami"] for r in rounds if "_ami" in r]
    if args.critical_path:
        from ami_dist.config import load_config

        path = critical_path(load_config(args.config))
        against = "deepspeed" if "deepspeed" in rows else rows[0]
        step_ms = statistics.median(1000 * r[against]["seconds"] / args.steps for r in rounds)
        per_step_log = path["log_ms"] / path["log_every"]
        print(f"\nBesides the step ({step_ms:.0f} ms, {against}): batch assembly {path['batch_ms']:.2f} ms per "
              f"step ({100 * path['batch_ms'] / step_ms:.2f}%); one MLflow log call of {path['metrics']} metrics "
              f"{path['log_ms']:.1f} ms every {path['log_every']} steps = {per_step_log:.2f} ms per step "
              f"({100 * per_step_log / step_ms:.3f}%); tokenising {path['pairs']} training pairs "
              f"{path['encode_s']:.2f} s once, before the first step")
    if ami_rounds:
        costs = [(a["both_seconds"] - a["mle_seconds"]) / a["mle_seconds"] for a in ami_rounds]
        ami = ami_rounds[0] if len(ami_rounds) == 1 else None
        each = (f"MLE step {1000 * ami['mle_seconds'] / ami['steps']:.0f} ms, MLE + adversarial update "
                f"{1000 * ami['both_seconds'] / ami['steps']:.0f} ms; " if ami else "")
        median = "" if ami else f" (median of {len(costs)} rounds; {spread(costs, '.2f')})"
        print(f"\nAMI forward phase, 1 rank: {each}the adversarial update (K = {ami_rounds[0]['k']}) costs "
              f"{statistics.median(costs):.2f}x an MLE step{median} (target: <= K + 2 = {ami_rounds[0]['k'] + 2})")
    if args.json:
        first = rounds[0]
        figures = {name: {"tgt_tokens_per_s": rate(first[name]), "ms_per_step": 1000 * first[name]["seconds"]
                          / first[name]["steps"], "gpu_peak_mb": first[name].get("gpu_peak_mb")} for name in rows}
        if "_ami" in first:
            a = first["_ami"]
            cost = (a["both_seconds"] - a["mle_seconds"]) / a["mle_seconds"]
            figures["ami_adversarial"] = {"tgt_tokens_per_s": a["tgt_tokens"] / a["both_seconds"],
                                          "ms_per_step": 1000 * a["both_seconds"] / a["steps"],
                                          "cost_in_mle_steps": cost, "gpu_peak_mb": a.get("gpu_peak_mb")}
        Path(args.json).write_text(json.dumps({"config": args.config, "preset": args.preset, "rows": figures},
                                              indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
