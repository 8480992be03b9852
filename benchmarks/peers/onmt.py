"""OpenNMT-py on the same model, data and machine as our MLE step: target tokens/s and peak RSS.

The peer runs from its own virtualenv (never a dependency of this project), with the same torch as ours:

    python3 -m venv /tmp/onmt-venv
    /tmp/onmt-venv/bin/pip install torch==2.13.0
    /tmp/onmt-venv/bin/pip install --no-deps OpenNMT-py==3.5.1
    /tmp/onmt-venv/bin/pip install configargparse pyyaml sacrebleu six pyonmttok spacy pyahocorasick \\
        rapidfuzz tensorboard waitress flask fasttext-wheel

(OpenNMT-py 3.5.1 declares torch<2.3; its training path runs on 2.13.) Point ``--onmt_venv`` or
$ONMT_VENV at it. The training pairs are our pipeline's (the config's reader, tokenisation and history
truncation) in the exact batches our 1-rank variants train on, in the same order (a bucket of one batch
keeps OpenNMT-py from re-batching them), with one shared word vocabulary as ours; the model is
the config's LSTM (layers, sizes, general attention, input feeding, dropout) with SGD, or its Transformer
(layers, width, heads, FFN, dropout, sinusoidal positions) with Adam and the Noam schedule, with the config's
LR, clipping and label smoothing, batches of train.batch_size sentences. Throughput comes from OpenNMT-py's
own report lines over the timed steps (after warm-up), peak RSS from the process's rusage.

Used by ``benchmarks/train_throughput.py --peer onmt [--onmt_venv DIR]``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# "Step 10/   25; acc: 3.1; ppl: 9e+03; xent: 9.1; lr: 1.00000; sents:     320; bsz:   30/  13/ 6; 1162/ 441 tok/s;"
REPORT = re.compile(r"Step\s+(\d+)/\s*\d+;.*?bsz:\s*(\d+)/\s*(\d+)/\s*\d+;\s*(\d+)/\s*(\d+) tok/s;")


def write_corpus(pairs: list[tuple[str, str]], out: Path, name: str) -> None:
    """The pairs, in order, as OpenNMT-py's whitespace-tokenised text files ``name``.src / ``name``.tgt."""
    (out / f"{name}.src").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (out / f"{name}.tgt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


def onmt_config(cfg, data: Path, corpus: str, steps: int, report_every: int) -> dict:
    m, o = cfg.model, cfg.optim
    conf = {
        "save_data": str(data / "onmt"),
        "src_vocab": str(data / "vocab.src"), "tgt_vocab": str(data / "vocab.tgt"), "share_vocab": True,
        "src_vocab_size": cfg.vocab.size, "tgt_vocab_size": cfg.vocab.size, "overwrite": True,
        "data": {"corpus_1": {"path_src": str(data / f"{corpus}.src"), "path_tgt": str(data / f"{corpus}.tgt")}},
        "model_type": "text", "enc_layers": m.enc_layers, "dec_layers": m.dec_layers, "hidden_size": m.hidden_size,
        "word_vec_size": m.emb_dim, "dropout": [m.dropout],
        "optim": o.name, "learning_rate": o.lr, "max_grad_norm": o.max_grad_norm,
        "batch_size": cfg.train.batch_size, "batch_type": "sents", "valid_batch_size": cfg.train.batch_size,
        # a bucket of exactly one batch: OpenNMT-py then trains on our batches, in our order
        "bucket_size": cfg.train.batch_size, "prefetch_factor": 1,
        "train_steps": steps, "report_every": report_every, "valid_steps": 10**9,
        "save_checkpoint_steps": 10**9, "save_model": str(data / "model"), "seed": cfg.run.seed,
        "num_workers": 0, "world_size": 1, "gpu_ranks": [], "label_smoothing": cfg.train.label_smoothing,
    }
    if m.family == "lstm":
        conf |= {"encoder_type": "rnn", "decoder_type": "rnn", "rnn_type": "LSTM", "brnn": m.bidirectional,
                 "global_attention": m.attention, "input_feed": int(m.input_feed), "attention_dropout": [0.0],
                 "param_init": 0.1}
    else:  # the Transformer: sinusoidal positions, Glorot initialisation, Adam with the Noam schedule
        conf |= {"encoder_type": "transformer", "decoder_type": "transformer", "heads": m.heads,
                 "transformer_ff": m.ffn_size, "position_encoding": True, "attention_dropout": [m.dropout],
                 "param_init": 0.0, "param_init_glorot": True, "adam_beta1": o.adam_beta1,
                 "adam_beta2": o.adam_beta2, "decay_method": "noam" if o.schedule == "noam" else "none",
                 "warmup_steps": o.warmup_steps}
    return conf


def run_peer(venv: Path, cfg, pairs: list[tuple[str, str]], vocab_pairs: list[tuple[str, str]], steps: int,
             warmup: int, threads: int) -> dict:
    """OpenNMT-py trained on ``pairs`` (warmup + steps batches of train.batch_size, in order), with the
    word vocabulary of ``vocab_pairs`` (our whole training split, as our vocabulary is)."""
    if cfg.vocab.kind != "words":
        raise SystemExit("the OpenNMT-py peer is set up for the word-level recipes (vocab.kind: words)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_corpus(pairs, data, "batches")
        write_corpus(vocab_pairs, data, "all")
        conf, vocab_conf = data / "onmt.yaml", data / "vocab.yaml"
        conf.write_text(yaml.safe_dump(onmt_config(cfg, data, "batches", warmup + steps, 1)))
        vocab_conf.write_text(yaml.safe_dump(onmt_config(cfg, data, "all", warmup + steps, 1)))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONWARNINGS": "ignore"}
        subprocess.run([str(venv / "bin/onmt_build_vocab"), "-config", str(vocab_conf), "-n_sample", "-1"], env=env,
                       check=True, capture_output=True)
        log = data / "train.log"
        with log.open("w") as out:
            proc = subprocess.Popen([str(venv / "bin/onmt_train"), "-config", str(conf)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
            started = time.perf_counter()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
        text = log.read_text(errors="replace")
        if status != 0:
            raise SystemExit(f"onmt_train failed:\n{text[-3000:]}")
        # one report per step: its batch's source and target tokens and its tokens/s, so its time is tokens / rate
        reports = [tuple(map(int, r)) for r in REPORT.findall(text)]
        timed = [(src, tgt, tgt / tgt_rate) for step, src, tgt, _, tgt_rate in reports if step > warmup and tgt_rate]
        if len(timed) < steps:
            raise SystemExit(f"expected {steps} report lines after step {warmup}, found {len(timed)}:\n{text[-2000:]}")
        seconds = sum(t for _, _, t in timed)
        return {"tgt_tokens": float(sum(t for _, t, _ in timed)), "src_tokens": float(sum(s for s, _, _ in timed)),
                "seconds": seconds, "steps": len(timed), "threads": threads, "world": 1,
                "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall}


if __name__ == "__main__":
    raise SystemExit("run it through benchmarks/train_throughput.py --peer onmt (same batches as ours)")
