"""Validation: perplexity and greedy decoding of each network, sacreBLEU/chrF on rank 0.

All ranks take part (the validation set is sharded) and run the same number of forward calls, which
ZeRO-3 requires because every call gathers parameters collectively.
"""

from __future__ import annotations

import math

import torch
from sacrebleu.metrics import BLEU, CHRF
from tqdm import tqdm

from ami_dist.decoding.greedy import greedy_decode
from ami_dist.decoding.rerank import source_logq
from ami_dist.run_dir import RunDir
from ami_dist.training.context import Network, Run
from ami_dist.training.critic import load_fixed_critic
from ami_dist.training.losses import token_nll
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
def reconstruction_logq(run: Run, hyps: list[tuple[int, list[int]]],
                        critic: torch.nn.Module) -> list[tuple[int, float]]:
    """Length-normalised log q_φ(S | T̂) of each of this rank's forward outputs T̂ under ``critic``.

    The E[log q(S|T)] term of AMI's mutual-information lower bound, per validation sentence. ``critic`` is
    the backward network (or the fixed critic); every rank runs the same number of batches.
    """
    cfg, comm, vocab = run.cfg, run.comm, run.vocab
    fw = run.network("forward")
    outputs = dict(hyps)
    batches = shard_batches([len(s) for s in fw.valid.src_ids], cfg.eval.batch_size, comm.rank, comm.world_size)
    values: list[tuple[int, float]] = []
    device = run.network("backward").engine.device
    for indices in batches:
        real = indices is not None
        rows = indices if real else [0]
        logq = source_logq(critic, [outputs.get(i, []) for i in rows], [fw.valid.src_ids[i] for i in rows],
                           pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id, length_normalise=True,
                           device=device)
        if real:
            values.extend(zip(rows, logq, strict=True))
    return values


def _logq_terms(run: Run, hyps: list[tuple[int, list[int]]]) -> dict[str, list[tuple[int, float]]]:
    """log q(S|T̂) per sentence under the backward network (mi_logq) and under the fixed critic (mi_logq_fixed)."""
    bw = run.network("backward").engine
    bw.eval()
    terms = {"mi_logq": reconstruction_logq(run, hyps, bw.module)}
    bw.train()
    if run.critic is None:
        run.critic = load_fixed_critic(run)
    if run.critic is not None:
        terms["mi_logq_fixed"] = reconstruction_logq(run, hyps, run.critic)
    return terms


def evaluate(run: Run) -> dict[str, float]:
    """Evaluate every network; on rank 0 log the metrics, write hypotheses and return the metrics."""
    cfg, comm, vocab = run.cfg, run.comm, run.vocab
    metrics: dict[str, float] = {}
    bleu = BLEU(tokenize=cfg.eval.bleu_tokenize)
    chrf = CHRF()
    for net in run.networks:
        net.engine.eval()
        ppl, hyps = evaluate_network(run, net)
        terms = _logq_terms(run, hyps) if net.name == "forward" else {}
        net.engine.train()
        gathered = comm.gather(hyps)
        gathered_terms = {name: comm.gather(values) for name, values in terms.items()}
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
        _write_outputs(run, net, outputs)
        for name, parts in gathered_terms.items():
            values = dict(pair for part in parts for pair in part)
            ordered = [values[i] for i in range(len(net.valid))]
            metrics[f"valid/{name}"] = sum(ordered) / max(len(ordered), 1)
            _write_values(run, f"{net.name}.step{run.step}.{name}", ordered)
    if comm.is_main:
        run.bleu_signature = str(bleu.get_signature())
        summary = "  ".join(f"{k.removeprefix('valid/')} {v:.2f}" for k, v in metrics.items())
        tqdm.write(f"step {run.step} validation: {summary}")
        run.tracker.log_metrics(metrics, run.step)
        run.tracker.set_tags({"bleu_signature": run.bleu_signature})
    return metrics


def _write_values(run: Run, name: str, values: list[float]) -> None:
    """One number per validation sentence (for paired significance tests between runs)."""
    path = RunDir(run.run_dir).valid / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(f"{v:.6f}\n" for v in values), encoding="utf-8")
    run.tracker.log_artifact(path, f"valid/step{run.step}")


def _write_outputs(run: Run, net: Network, outputs: list[str]) -> None:
    out_dir = RunDir(run.run_dir).valid
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

