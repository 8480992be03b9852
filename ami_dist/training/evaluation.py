"""Validation: perplexity and greedy decoding of each network, sacreBLEU/chrF on rank 0.

All ranks take part (the validation set is sharded) and run the same number of forward calls, which
ZeRO-3 requires because every call gathers parameters collectively.
"""

from __future__ import annotations

import math

import torch
from sacrebleu.metrics import BLEU, CHRF
from tqdm import tqdm

from ami_dist.data.batching import make_batch
from ami_dist.decoding.greedy import greedy_decode
from ami_dist.training.context import Network, Run
from ami_dist.training.losses import sentence_nll, token_nll
from ami_dist.training.metrics import distinct_n, mean_length


def shard_batches(lengths: list[int], batch_size: int, rank: int, world: int) -> list[list[int] | None]:
    """This rank's validation batches (length-sorted for little padding), padded with None to equal count."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine: list[list[int] | None] = list(batches[rank::world])
    per_rank = math.ceil(len(batches) / world)
    return mine + [None] * (per_rank - len(mine))


@torch.no_grad()
def evaluate_network(run: Run, net: Network) -> tuple[float, list[tuple[int, list[int]]]]:
    """(perplexity over the whole validation set, this rank's (index, hypothesis ids) pairs)."""
    cfg, comm, vocab = run.cfg, run.comm, run.vocab
    model = net.engine.module
    valid = net.valid
    batches = shard_batches([len(s) for s in valid.src_ids], cfg.eval.batch_size, comm.rank, comm.world_size)
    nll, tokens = 0.0, 0
    hyps: list[tuple[int, list[int]]] = []
    for indices in batches:
        # A rank with fewer batches decodes a stand-in batch and throws the result away (ZeRO-3 lockstep).
        real = indices is not None
        batch = net.batch(indices if real else [0], vocab, valid)
        loss, ntok = token_nll(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out, vocab.pad_id)
        max_len = int(cfg.eval.max_len_a * int(batch.src_lengths.max()) + cfg.eval.max_len_b)
        out = greedy_decode(model, batch.src, batch.src_lengths, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                            pad_id=vocab.pad_id, max_len=max_len, all_done=comm.all_true)
        if real:
            nll += float(loss)
            tokens += int(ntok)
            hyps.extend(zip(indices, out, strict=True))
    total_nll, total_tokens = comm.sum([nll, float(tokens)])
    return math.exp(min(total_nll / max(total_tokens, 1.0), 50.0)), hyps


@torch.no_grad()
def reconstruction_logq(run: Run, hyps: list[tuple[int, list[int]]]) -> float:
    """Mean length-normalised log q_φ(S | T̂) of the forward network's outputs T̂ under the backward network.

    The E[log q(S|T)] term of AMI's mutual-information lower bound, evaluated on the validation set.
    ``hyps`` are this rank's (index, ids) from the forward network; every rank runs the same batches.
    """
    cfg, comm, vocab = run.cfg, run.comm, run.vocab
    fw, bw = run.network("forward"), run.network("backward")
    outputs = dict(hyps)
    batches = shard_batches([len(s) for s in fw.valid.src_ids], cfg.eval.batch_size, comm.rank, comm.world_size)
    total, count = 0.0, 0
    for indices in batches:
        real = indices is not None
        rows = indices if real else [0]
        # An empty output is read as the single token EOS, as in training.
        sources = [outputs.get(i) or [vocab.eos_id] for i in rows]
        batch = make_batch(sources, [fw.valid.src_ids[i] for i in rows], vocab.pad_id, vocab.bos_id,
                           vocab.eos_id).to(bw.engine.device)
        logits = bw.engine.module(batch.src, batch.src_lengths, batch.tgt_in)
        nll = sentence_nll(logits, batch.tgt_out, vocab.pad_id, length_normalise=True)
        if real:
            total += float(-nll.sum())
            count += len(rows)
    total, count = comm.sum([total, float(count)])
    return total / max(count, 1.0)


def evaluate(run: Run) -> dict[str, float]:
    """Evaluate every network; on rank 0 log the metrics, write hypotheses and return the metrics."""
    cfg, comm, vocab = run.cfg, run.comm, run.vocab
    metrics: dict[str, float] = {}
    bleu = BLEU(tokenize=cfg.eval.bleu_tokenize)
    chrf = CHRF()
    for net in run.networks:
        net.engine.eval()
        ppl, hyps = evaluate_network(run, net)
        if net.name == "forward":
            bw = run.network("backward").engine
            bw.eval()
            mi_term = reconstruction_logq(run, hyps)
            bw.train()
        net.engine.train()
        gathered = comm.gather(hyps)
        if not comm.is_main:
            continue
        by_index = dict(pair for part in gathered for pair in part)
        outputs = [vocab.decode(by_index[i]) for i in range(len(net.valid))]
        refs = [tgt for _, tgt in net.valid.pairs]
        metrics[f"valid/{net.short}_ppl"] = ppl
        metrics[f"valid/{net.short}_bleu"] = bleu.corpus_score(outputs, [refs]).score
        metrics[f"valid/{net.short}_chrf"] = chrf.corpus_score(outputs, [refs]).score
        metrics[f"valid/{net.short}_distinct1"] = distinct_n(outputs, 1)
        metrics[f"valid/{net.short}_distinct2"] = distinct_n(outputs, 2)
        metrics[f"valid/{net.short}_length"] = mean_length(outputs)
        if net.name == "forward":
            metrics["valid/mi_logq"] = mi_term
        _write_outputs(run, net, outputs)
    if comm.is_main:
        run.bleu_signature = str(bleu.get_signature())
        summary = "  ".join(f"{k.removeprefix('valid/')} {v:.2f}" for k, v in metrics.items())
        tqdm.write(f"step {run.step} validation: {summary}")
        run.tracker.log_metrics(metrics, run.step)
        run.tracker.set_tags({"bleu_signature": run.bleu_signature})
    return metrics


def _write_outputs(run: Run, net: Network, outputs: list[str]) -> None:
    out_dir = run.run_dir / "valid"
    out_dir.mkdir(exist_ok=True)
    hyp_path = out_dir / f"{net.name}.step{run.step}.hyp"
    hyp_path.write_text("".join(h + "\n" for h in outputs), encoding="utf-8")
    samples = []
    for i in range(min(run.cfg.eval.samples, len(outputs))):
        src, ref = net.valid.pairs[i]
        samples.append(f"SRC: {src}\nREF: {ref}\nHYP: {outputs[i]}\n")
    sample_path = out_dir / f"{net.name}.step{run.step}.samples.txt"
    sample_path.write_text("\n".join(samples), encoding="utf-8")
    for path in (hyp_path, sample_path):
        run.tracker.log_artifact(path, f"valid/step{run.step}")

