"""Decode a test set with an exported model and report sacreBLEU, chrF, distinct-1/2, length and perplexity.

    python -m ami_dist.evaluate --model runs/<run>/model.pt --src data/tatoeba_en_de/test.en \\
        --ref data/tatoeba_en_de/test.de --beam 5 --rerank mmi --out test.hyp

``--dialogs FILE`` reads PersonaChat text instead (sources built as in training). Results go to a new
MLflow run nested under the training run (same store and experiment), unless ``--no_mlflow``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from sacrebleu.metrics import BLEU, CHRF

from ami_dist.data.batching import make_batch
from ami_dist.data.dialog import dialog_pairs, read_personachat
from ami_dist.data.textio import read_lines
from ami_dist.decoding.rerank import Reranker, source_logq
from ami_dist.decoding.strategy import Strategy, decode_all
from ami_dist.entry import Parser, command
from ami_dist.errors import UserError
from ami_dist.export import Exported, load_exported
from ami_dist.models import Seq2Seq
from ami_dist.training.losses import token_nll
from ami_dist.training.metrics import distinct_n, mean_length


def read_inputs(args: argparse.Namespace, exported: Exported) -> tuple[list[str], list[str] | None]:
    """Source sentences and, when given, references (a missing or misaligned file is a UserError)."""
    data = exported.source["data"]
    max_chars = data.get("max_line_chars")  # absent from models exported before the key existed
    if args.dialogs:
        pairs = dialog_pairs(read_personachat(args.dialogs, max_chars), data["max_history_turns"],
                             data["include_persona"])
        sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    else:
        sources = read_lines(args.src, max_chars=max_chars)
        refs = read_lines(args.ref, max_chars=max_chars) if args.ref else None
        if refs is not None and len(refs) != len(sources):
            raise UserError(f"{args.src} has {len(sources)} lines but {args.ref} has {len(refs)}: source and "
                            "reference files must be aligned line by line")
    if data.get("lowercase"):
        sources = [s.lower() for s in sources]
        refs = [r.lower() for r in refs] if refs is not None else None
    return sources, refs


def decode(args: argparse.Namespace, exported: Exported, sources: list[list[int]]) -> list[list[int]]:
    """The best hypothesis's ids for every source, in input order."""
    strategy = Strategy("greedy" if args.beam == 1 and args.rerank == "none" else "beam", beam=args.beam,
                        pool=args.n_best, length_penalty=args.length_penalty, max_len_a=args.max_len_a,
                        max_len_b=args.max_len_b, scored=False,
                        rerank=Reranker(args.rerank, args.mmi_alpha, args.mmi_gamma) if args.rerank != "none" else None)
    found = decode_all(strategy, exported.networks[args.direction], exported.opposite(args.direction), sources,
                       exported.vocab, args.batch_size)
    return [hyps[0].tokens for hyps in found]


@torch.no_grad()
def perplexity(exported: Exported, direction: str, sources: list[list[int]], refs: list[list[int]],
               batch_size: int) -> float:
    """exp of the mean token NLL of the references (EOS included) under the network, teacher-forced."""
    vocab, model = exported.vocab, exported.networks[direction]
    nll, tokens = 0.0, 0
    for start in range(0, len(sources), batch_size):
        batch = make_batch(sources[start : start + batch_size], refs[start : start + batch_size], vocab.pad_id,
                           vocab.bos_id, vocab.eos_id)
        loss, ntok = token_nll(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out, vocab.pad_id)
        nll, tokens = nll + float(loss), tokens + int(ntok)
    return math.exp(min(nll / max(tokens, 1), 50.0))


def load_critic(path: str, exported: Exported) -> Seq2Seq:
    """The fixed critic: the backward network of an exported model file, or a network's checkpoint directory
    (``RUN_DIR/checkpoints/backward``); either must fit the evaluated model's config and vocabulary."""
    from ami_dist.training.critic import build_critic, critic_weights

    if Path(path).is_dir():
        return build_critic(critic_weights(path), exported.model_config, len(exported.vocab), exported.vocab.pad_id,
                            path)
    other = load_exported(path)
    if other.vocab.to_bytes() != exported.vocab.to_bytes():
        raise UserError(f"--fixed_critic {path}: its vocabulary is not the evaluated model's")
    return other.networks["backward"]


@torch.no_grad()
def mi_logq(critic: Seq2Seq, hyps: list[list[int]], sources: list[list[int]], exported: Exported,
            batch_size: int) -> list[float]:
    """Length-normalised log q(S | T̂) of every source given its hypothesis, under ``critic``."""
    vocab, values = exported.vocab, []
    for start in range(0, len(sources), batch_size):
        values += source_logq(critic, hyps[start : start + batch_size], sources[start : start + batch_size],
                              pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id, length_normalise=True)
    return values


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    exported = load_exported(args.model)
    vocab = exported.vocab
    texts, refs = read_inputs(args, exported)
    # a bad critic fails before anything is decoded or written
    fixed = load_critic(args.fixed_critic, exported) if args.fixed_critic and args.direction == "forward" else None
    sources = vocab.encode_batch(texts)
    hyp_ids = decode(args, exported, sources)
    hyps = [vocab.decode(ids) for ids in hyp_ids]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    metrics = {"test/distinct1": distinct_n(hyps, 1), "test/distinct2": distinct_n(hyps, 2),
               "test/length": mean_length(hyps)}
    signature = ""
    if args.direction == "forward":  # the mutual-information term, by the run's own backward network and a fixed one
        critics = {"test/mi_logq": exported.networks["backward"]}
        if fixed is not None:
            critics["test/mi_logq_fixed"] = fixed
        for key, critic in critics.items():
            values = mi_logq(critic, hyp_ids, sources, exported, args.batch_size)
            metrics[key] = sum(values) / max(len(values), 1)
    if refs is not None:
        bleu = BLEU(tokenize=args.tokenize or exported.source["eval"]["bleu_tokenize"])
        metrics["test/bleu"] = bleu.corpus_score(hyps, [refs]).score
        signature = str(bleu.get_signature())
        metrics["test/chrf"] = CHRF().corpus_score(hyps, [refs]).score
        metrics["test/ppl"] = perplexity(exported, args.direction, sources, vocab.encode_batch(refs), args.batch_size)
    summary = "  ".join(f"{k.removeprefix('test/')} {v:.4f}" if "distinct" in k
                        else f"{k.removeprefix('test/')} {v:.2f}" for k, v in metrics.items())
    print(f"{len(hyps)} sentences -> {out}\n{summary}")
    if signature:
        print(f"sacreBLEU signature: {signature}")
    if not args.no_mlflow:
        _log(args, exported, metrics, signature, out)
    return metrics


def _log(args: argparse.Namespace, exported: Exported, metrics: dict[str, float], signature: str, out: Path) -> None:
    from ami_dist.tracking import MlflowTracker

    source = exported.source
    tags = {"kind": "evaluation", "evaluated_model": str(Path(args.model).resolve()), "task": source["task"]}
    if source.get("mlflow_run_id"):
        tags["mlflow.parentRunId"] = source["mlflow_run_id"]  # nests the evaluation under its training run
    if signature:
        tags["bleu_signature"] = signature
    # An unreachable server costs nothing computed here: the records wait in a buffer beside the output
    # (the run is created when it is replayed: python -m ami_dist.tracking replay BUFFER).
    tracker = MlflowTracker(source["tracking_uri"], source["experiment"], f"eval-{Path(args.out).stem}", tags,
                            buffer_dir=out.parent, buffer_name=f"{out.name}.mlflow_buffer.jsonl", start_offline=True)
    tracker.log_params({k: v for k, v in vars(args).items() if k not in ("model", "no_mlflow")})
    tracker.log_metrics(metrics, 0)
    results = out.with_suffix(out.suffix + ".json")
    results.write_text(json.dumps({"metrics": metrics, "bleu_signature": signature}, indent=2) + "\n")
    tracker.log_artifact(out, "evaluation")
    tracker.log_artifact(results, "evaluation")
    tracker.finish()
    if tracker.run_id is not None:
        print(f"MLflow evaluation run {tracker.run_id} (under training run {source.get('mlflow_run_id') or '-'})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m ami_dist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model (python -m ami_dist.export RUN_DIR)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--src", help="source sentences, one per line")
    group.add_argument("--dialogs", help="PersonaChat dialogs (ParlAI fbdialog text)")
    p.add_argument("--ref", help="references aligned with --src (for BLEU, chrF and perplexity)")
    p.add_argument("--out", default="hypotheses.txt", help="where to write the hypotheses")
    p.add_argument("--direction", choices=("forward", "backward"), default="forward")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--n_best", type=int, default=1, help="hypotheses kept per sentence for reranking")
    p.add_argument("--length_penalty", type=float, default=0.0, help="GNMT length penalty α")
    p.add_argument("--rerank", choices=("none", "mmi", "backward"), default="none")
    p.add_argument("--mmi_alpha", type=float, default=0.5, help="weight of log q(S|T) in mmi reranking")
    p.add_argument("--mmi_gamma", type=float, default=0.0, help="length bonus per token in mmi reranking")
    p.add_argument("--max_len_a", type=float, default=1.5)
    p.add_argument("--max_len_b", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--tokenize", help="sacreBLEU tokenizer (default: the run's eval.bleu_tokenize)")
    p.add_argument("--fixed_critic", metavar="MODEL_OR_CHECKPOINT",
                   help="also score log q(S|T̂) with this backward network (an exported model file or a run's "
                   "checkpoints/backward directory), as test/mi_logq_fixed: the same critic for every model compared")
    p.add_argument("--no_mlflow", action="store_true", help="do not log the evaluation to MLflow")
    args = p.parse_args(argv)
    if args.beam < 1 or not 1 <= args.n_best <= args.beam:
        p.error("need --beam >= 1 and 1 <= --n_best <= --beam")
    if args.rerank != "none" and args.n_best < 2:
        p.error("--rerank needs an n-best list: set --beam and --n_best >= 2")
    if args.dialogs and args.ref:
        p.error("--ref goes with --src; PersonaChat dialogs carry their own responses")
    return args


@command
def main(argv: list[str] | None = None) -> int:
    evaluate(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
