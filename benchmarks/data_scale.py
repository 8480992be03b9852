"""Data at WMT scale: the in-memory path every rank took before the prepare step, against the prepared one.

Builds WMT-shaped synthetic corpora from the bundled Tatoeba sample (three pairs joined per line, about 20
words a side) at 0.1M and 1M pairs (and 4.5M, the size of WMT14 En-De, with ``--full``), and prints for
each, in one run:

- **prepare**: ``ami-prepare`` with every core (check, BPE on a seeded sample, encode, write), against the
  in-memory path's read + BPE + single-process encode on one rank;
- **start-up**: two ranks started together, from process start to the first batch of the sampler (data
  only: the in-memory path reads, trains the vocabulary on rank 0 and encodes on both ranks; the prepared
  path maps the files), and, for the prepared path, the trainer itself: 2 ranks started as ``srun``
  starts them, to the end of the first training step and the checkpoint after it
  (``train.stop_after_steps=1``), as a requeued job would start;
- **memory per rank** at that first batch (for the prepared path after reading every page of the ids, as
  an epoch does), from ``/proc/self/smaps_rollup``, above the same process just after its imports, with
  both ranks alive: private (``Private_Dirty``: the rank's own) and shared (``Shared_Clean``: page cache
  mapped by both ranks);
- **disk**: the prepared directory's bytes;
- **padding**: the share of padded positions (1 − real tokens / computed tokens) under sentence batching
  (``train.batch_size`` sentences per rank) and token batching (``--batch-tokens`` per rank-batch).

The in-memory path is not run at 4.5M pairs (two ranks would need ~25 GB). The vocabulary is BPE of
``--vocab-size`` pieces. Results: benchmarks/results/data_scale.md.

Usage: python benchmarks/data_scale.py [--full] [--work DIR] [--vocab-size 8000] [--batch-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable

RANK = textwrap.dedent("""
    import json, os, sys, time
    start = time.perf_counter()
    from pathlib import Path
    import numpy as np
    from ami_dist.config import load_config
    from ami_dist.procmem import smaps_rollup as smaps
    from ami_dist.data.batching import ShardedBucketSampler, make_batch

    mode, config, rank, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])


    cfg = load_config(config, [])
    before, times = smaps(), {}
    if mode == "memory":  # what every rank did before the prepare step (ami_dist/training/build.py, 2026-11)
        from ami_dist.data.corpus import encode_split, read_split
        from ami_dist.data.vocab import train_vocab, vocab_from_bytes
        t = time.perf_counter()
        pairs = read_split(cfg.data, "train")
        times["read"] = time.perf_counter() - t
        vocab_file = out / "vocab.model"
        if rank == 0:  # rank 0 trained the vocabulary and broadcast it; the other waited
            t = time.perf_counter()
            vocab = train_vocab(cfg.vocab.kind, [s for s, _ in pairs] + [t for _, t in pairs], cfg.vocab.size,
                                cfg.vocab.character_coverage)
            times["vocab"] = time.perf_counter() - t
            (out / "vocab.tmp").write_bytes(vocab.to_bytes())
            os.replace(out / "vocab.tmp", vocab_file)
        else:
            while not vocab_file.exists():
                time.sleep(0.05)
            vocab = vocab_from_bytes(cfg.vocab.kind, vocab_file.read_bytes())
        t = time.perf_counter()
        train, _ = encode_split(pairs, vocab, cfg.data.max_src_len, cfg.data.max_tgt_len)
        times["encode"] = time.perf_counter() - t
        src, tgt = train.src_ids, train.tgt_ids
        src_len, tgt_len = [len(s) for s in src], [len(s) for s in tgt]
    else:
        from ami_dist.data.prepared import open_prepared
        data = open_prepared(cfg.data.prepared)
        src, tgt = data.train.src_ids, data.train.tgt_ids
        src_len, tgt_len = src.lengths(), tgt.lengths()
    sampler = ShardedBucketSampler(src_len, tgt_len, cfg.train.batch_size // 2, rank=rank, world=2)
    indices = next(iter(sampler))
    make_batch([src[i] for i in indices], [tgt[i] for i in indices], 0, 2, 3)
    times["first_batch"] = time.perf_counter() - start
    if mode == "prepared":  # an epoch reads every page of the ids; both ranks hold them mapped
        int(src.data.sum()) + int(tgt.data.sum())

    def wait_for(name):
        (out / f"{name}{rank}").touch()
        while not all((out / f"{name}{r}").exists() for r in range(2)):
            time.sleep(0.05)

    wait_for("ready")
    after = smaps()
    print(json.dumps({"times": times, "private": after["Private_Dirty"] - before["Private_Dirty"],
                      "shared": after["Shared_Clean"] - before["Shared_Clean"]}), flush=True)
    wait_for("measured")
""")


def _corpus(work: Path, pairs: int) -> dict[str, str]:
    paths = {}
    for side in ("en", "de"):
        path = work / f"wmt{pairs}.{side}"
        paths[side] = str(path)
        if path.exists():
            continue
        lines = (ROOT / f"data/tatoeba_en_de/train.{side}").read_text(encoding="utf-8").splitlines()
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            for i in range(pairs):
                f.write(" ".join(lines[(7 * i + 13 * j) % len(lines)] for j in range(3)) + "\n")
        os.replace(path.with_suffix(".tmp"), path)
    return paths


def _config(work: Path, pairs: int, args: argparse.Namespace, prepared: Path | None = None) -> Path:
    import yaml

    corpus = _corpus(work, pairs)
    data = {"format": "parallel", "valid_src": str(ROOT / "data/tatoeba_en_de/valid.en"),
            "valid_tgt": str(ROOT / "data/tatoeba_en_de/valid.de"), "valid_limit": 200, "max_src_len": 100,
            "max_tgt_len": 100, "cache_dir": str(work / "cache")}
    if prepared is None:
        data.update({"train_src": corpus["en"], "train_tgt": corpus["de"]})
    else:
        data.update({"prepared": str(prepared), "valid_src": None, "valid_tgt": None})
    cfg = {"run": {"name": f"scale{pairs}", "output_dir": str(work / "runs")}, "data": data,
           "vocab": {"kind": "sentencepiece", "size": args.vocab_size},
           "model": {"emb_dim": 32, "hidden_size": 32, "enc_layers": 1, "dec_layers": 1, "input_feed": False},
           "train": {"batch_size": 64, "mle_steps": 10}, "ami": {"enabled": False}, "tracking": {"enabled": False}}
    path = work / f"scale{pairs}{'-prepared' if prepared else ''}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _two_ranks(mode: str, config: Path, work: Path) -> list[dict]:
    out = work / f"ranks-{mode}-{config.stem}"
    out.mkdir(exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([PYTHON, "-c", RANK, mode, str(config), str(rank), str(out)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{mode} rank failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _prepare(config: Path) -> tuple[float, Path]:
    started = time.perf_counter()
    proc = subprocess.run([PYTHON, "-m", "ami_dist.prepare", "--config", str(config), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - started, Path(proc.stdout.strip().splitlines()[-1].split(":")[0])


def _launch(config: Path, work: Path) -> float:
    """Seconds from starting 2 ranks, as srun starts them (rank variables set, no launcher process), to
    the end of their first training step and the checkpoint after it (``train.stop_after_steps=1``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = work / "runs" / f"launch-{config.stem}-{time.time_ns()}"
    started = time.perf_counter()
    procs = []
    for rank in range(2):
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [PYTHON, "ami_dist/train.py", "--deepspeed_config", "configs/ds_zero2.json", "--config", str(config),
             "--run_dir", str(run_dir), "train.stop_after_steps=1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - started
    if any(p.returncode != 0 for p in procs):
        raise SystemExit("\n".join(o[-3000:] for o in outputs))
    return seconds


def _padding(prepared: Path, batch_tokens: int, batch_size: int) -> tuple[float, float, int]:
    sys.path.insert(0, str(ROOT))
    from ami_dist.data.batching import ShardedBucketSampler, padded_tokens, padding_fraction
    from ami_dist.data.prepared import open_prepared

    train = open_prepared(prepared).train
    src, tgt = train.src_ids.lengths(), train.tgt_ids.lengths()
    fractions, over = [], 0
    for tokens in (0, batch_tokens):
        sampler = ShardedBucketSampler(src, tgt, batch_size, seed=1, batch_tokens=tokens)
        batches = sampler.epoch_batches(0)
        fractions.append(padding_fraction(batches, src, tgt))
        if tokens:
            over = sum(padded_tokens(src[b], tgt[b]) > tokens for b in batches)
    return fractions[0], fractions[1], over


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**28 else f"{n / 2**20:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also 4.5M pairs (prepared path only)")
    parser.add_argument("--work", default="/tmp/ami-data-scale")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--sizes", default="", help="comma-separated pair counts instead of the defaults")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [100_000, 1_000_000] + (
        [4_500_000] if args.full else [])
    rows = []
    for pairs in sizes:
        print(f"--- {pairs} pairs", flush=True)
        raw = _config(work, pairs, args)
        memory = _two_ranks("memory", raw, work) if pairs <= 1_000_000 else None
        prepare_s, prepared = _prepare(raw)
        cached_s, _ = _prepare(raw)  # found in the cache: what a requeued job pays
        on_prepared = _config(work, pairs, args, prepared)
        mapped = _two_ranks("prepared", on_prepared, work)
        launch_s = _launch(on_prepared, work)
        sentence_pad, token_pad, over = _padding(prepared, args.batch_tokens, 32)
        disk = sum(p.stat().st_size for p in prepared.iterdir())
        rows.append({"pairs": pairs, "memory": memory, "prepare_s": prepare_s, "cached_s": cached_s,
                     "mapped": mapped, "launch_s": launch_s, "disk": disk, "sentence_pad": sentence_pad,
                     "token_pad": token_pad, "over_budget": over})
        print(json.dumps(rows[-1]), flush=True)
    demo = _padding(_prepare(ROOT / "configs/nmt_demo.yaml")[1], args.batch_tokens, 32)
    lines = [
        f"2 ranks, {os.cpu_count()} cores; BPE {args.vocab_size}; sentence batching 32 per rank, token batching "
        f"{args.batch_tokens} padded tokens per rank-batch.",
        "",
        "| pairs | in-memory: read / BPE / encode (rank 0) | prepare (all cores) | prepare, cached | start-up to first "
        "batch: in-memory / prepared | launch to first step (prepared) | private / rank: in-memory / prepared | "
        "shared / rank (prepared) | disk | padding: sentences / tokens |",
        "|---:|---|---:|---:|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        mem = r["memory"]
        old = (f"{mem[0]['times']['read']:.1f} / {mem[0]['times']['vocab']:.1f} / {mem[0]['times']['encode']:.1f} s"
               if mem else "not run")
        startup_old = f"{max(m['times']['first_batch'] for m in mem):.1f} s" if mem else "—"
        private_old = _gb(max(m["private"] for m in mem)) if mem else "—"
        lines.append(
            f"| {r['pairs']:,} | {old} | {r['prepare_s']:.1f} s | {r['cached_s']:.1f} s | {startup_old} / "
            f"{max(m['times']['first_batch'] for m in r['mapped']):.1f} s | {r['launch_s']:.1f} s | {private_old} / "
            f"{_gb(max(m['private'] for m in r['mapped']))} | {_gb(min(m['shared'] for m in r['mapped']))} | "
            f"{_gb(r['disk'])} | {r['sentence_pad']:.1%} / {r['token_pad']:.1%} ({r['over_budget']} over budget) |")
    lines += ["", f"NMT demo data (configs/nmt_demo.yaml): padding {demo[0]:.1%} with sentence batching, {demo[1]:.1%} "
              f"with token batching ({demo[2]} batches over budget)."]
    report = "\n".join(lines)
    print(report)
    (ROOT / "benchmarks/results").mkdir(exist_ok=True)
    (ROOT / "benchmarks/results/data_scale.md").write_text("# benchmarks/data_scale.py\n\n" + report + "\n",
                                                           encoding="utf-8")


if __name__ == "__main__":
    main()
