"""Translate or answer with an exported model: lines from a file or standard input, outputs as they come.

    ami-generate --model runs/<run>/model.pt < sentences.txt                 # greedy, one output per line
    ami-generate --model model.pt --input test.en --beam 5 --n_best 5        # n-best: LINE<TAB>SCORE<TAB>TEXT
    ami-generate --model model.pt --beam 10 --rerank mmi < test.en           # MMI-reranked beam
    ami-generate --model model.pt --sample --top_p 0.9 --num_samples 3 --seed 1 < test.en
    ami-generate --model dialog.pt --interactive                            # chat; history kept

Every input line gets its outputs, in order: one line each, or with several per input (or ``--scores``) the
tab-separated form, line number first. An empty input line gets empty outputs. For a dialog model a line is a
context: its turns separated by tabs or ``<sep>``, the last ``data.max_history_turns`` kept. A source longer than
the model was trained on (``data.max_src_len`` tokens) is truncated, with a warning on standard error.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from ami_dist.data.dialog import TURN_SEPARATOR, tokenize
from ami_dist.data.textio import decode_line, open_text_file
from ami_dist.decoding.beam import Hypothesis
from ami_dist.decoding.rerank import Reranker
from ami_dist.decoding.strategy import Strategy, decode_all
from ami_dist.entry import Parser, command
from ami_dist.errors import UserError
from ami_dist.export import Exported, load_exported
from ami_dist.models.seq2seq import Seq2Seq

RESET = "/reset"  # typed in --interactive: forget the conversation so far


def warn(message: str) -> None:
    print(f"ami-dist: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class Prompter:
    """Turns input text into the model's source ids, the way the run prepared its training sources."""

    exported: Exported
    direction: str = "forward"
    persona: list[str] = field(default_factory=list)

    @property
    def data(self) -> dict:
        return self.exported.source["data"]

    @property
    def dialog(self) -> bool:
        return self.data["format"] == "personachat"

    def __post_init__(self) -> None:
        # the persona lines as one tokenised turn, as training prepends them (when it did)
        persona = [self.tokens(p) for p in self.persona] if self.data.get("include_persona") else []
        self.persona_turn = " ".join(p for p in persona if p)

    def tokens(self, text: str) -> str:
        """A turn as training saw it: lower-cased if the run was, tokenised, space-joined."""
        return " ".join(tokenize(text.lower() if self.data.get("lowercase") else text))

    def turns(self, text: str) -> list[str]:
        """A dialog line's turns, tokenised as in training (tabs and ``<sep>`` both separate turns)."""
        parts = [p for chunk in text.split("\t") for p in chunk.split(TURN_SEPARATOR)]
        return [self.tokens(p) for p in parts if p.strip()]

    def context(self, turns: list[str]) -> str:
        """The source text of a dialog history: its last turns (after the persona, if the model was trained with
        one), ``<sep>``-joined as in training."""
        context = turns[-int(self.data["max_history_turns"]):]
        if self.persona_turn:
            context = [self.persona_turn, *context]
        return f" {TURN_SEPARATOR} ".join(context)

    def source(self, text: str) -> str:
        """The source text of an input line (empty for an empty line: it gets empty outputs)."""
        if not text.strip():
            return ""
        if self.dialog and self.direction == "forward":
            return self.context(self.turns(text))
        return text.lower() if self.data.get("lowercase") else text

    def ids(self, text: str, where: str) -> list[int]:
        """The source's ids, cut to ``data.max_src_len`` (a dialog keeps its latest tokens) with a warning."""
        ids = self.exported.vocab.encode(text) if text.strip() else []
        limit = int(self.data["max_src_len"])
        if len(ids) > limit:
            kept = "last" if self.dialog and self.direction == "forward" else "first"
            warn(f"{where}: {len(ids)} tokens, more than the model was trained on (data.max_src_len = {limit}): "
                 f"kept the {kept} {limit}")
            ids = ids[-limit:] if kept == "last" else ids[:limit]
        return ids


def read_input(stream: BinaryIO, name: str) -> Iterator[str]:
    """The lines of a binary stream as text; invalid UTF-8 or a NUL byte is a DataError naming the line."""
    for number, raw in enumerate(stream, start=1):
        yield decode_line(raw, name, number)


def chunks(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    """Lists of up to ``size`` lines; the lines read before a bad one are still given before its error."""
    chunk: list[str] = []
    try:
        for line in lines:
            chunk.append(line)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except UserError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


class Writer:
    def __init__(self, out: TextIO, exported: Exported, n: int, tabular: bool) -> None:
        self.out, self.vocab, self.n, self.tabular = out, exported.vocab, n, tabular

    def write(self, line_number: int, hyps: list[Hypothesis]) -> None:
        for hyp in hyps[: self.n]:
            text = self.vocab.decode(hyp.tokens)
            if self.tabular:
                score = "" if math.isnan(hyp.score) else f"{hyp.score:.4f}"  # NaN: nothing was decoded
                self.out.write(f"{line_number}\t{score}\t{text}\n")
            else:
                self.out.write(text + "\n")
        self.out.flush()


def strategy_from(args: argparse.Namespace, exported: Exported) -> Strategy:
    reranker = Reranker(args.rerank, args.mmi_alpha, args.mmi_gamma) if args.rerank != "none" else None
    evaluation = exported.source["eval"]  # the run's eval.* settings, written by every export
    limits = dict(max_len_a=evaluation["max_len_a"] if args.max_len_a is None else args.max_len_a,
                  max_len_b=evaluation["max_len_b"] if args.max_len_b is None else args.max_len_b)
    if args.sample:
        return Strategy("sample", num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, rerank=reranker, **limits)
    if args.beam == 1 and reranker is None:
        return Strategy("greedy", scored=args.tabular, **limits)
    # reranking reorders the whole beam; otherwise the search keeps only what is written
    pool = args.beam if reranker is not None else args.n_best
    return Strategy("beam", beam=args.beam, pool=pool, length_penalty=args.length_penalty, rerank=reranker, **limits)


@dataclass
class Job:
    """What decoding an input needs: the model and its opposite, the strategy, how inputs become sources."""

    args: argparse.Namespace
    exported: Exported
    strategy: Strategy
    model: Seq2Seq
    other: Seq2Seq
    prompter: Prompter


def setup(args: argparse.Namespace, exported: Exported) -> Job:
    prompter = Prompter(exported, args.direction, args.persona or [])
    if args.persona and not (prompter.dialog and prompter.data.get("include_persona")):
        warn("--persona is ignored: the model was not trained with personas (data.include_persona)")
    return Job(args, exported, strategy_from(args, exported), exported.networks[args.direction],
               exported.opposite(args.direction), prompter)


def decode_lines(job: Job, lines: list[str], name: str, first_index: int) -> list[list[Hypothesis]]:
    """The hypotheses of input lines ``first_index + 1 ...`` of ``name`` (what fixes each line's samples)."""
    prompter = job.prompter
    sources = [prompter.ids(prompter.source(line), f"{name}:{first_index + i + 1}") for i, line in enumerate(lines)]
    return decode_all(job.strategy, job.model, job.other, sources, job.exported.vocab, job.args.batch_size,
                      first_index=first_index)


def generate(args: argparse.Namespace) -> None:
    job = setup(args, load_exported(args.model))
    writer = Writer(sys.stdout, job.exported, args.n_best, args.tabular)
    if args.interactive:
        chat(job, writer)
        return
    name = "<stdin>" if args.input == "-" else args.input
    stream = sys.stdin.buffer if args.input == "-" else open_text_file(args.input)
    batch_size = 1 if args.input == "-" and sys.stdin.isatty() else args.batch_size
    number = 0
    with stream:
        for chunk in chunks(read_input(stream, name), batch_size):
            for hyps in decode_lines(job, chunk, name, number):
                number += 1
                writer.write(number, hyps)


def chat(job: Job, writer: Writer) -> None:
    """Answer each line typed, keeping the conversation as training built its sources: the partner's turns and
    the model's answers, the last ``max_history_turns`` of them ``<sep>``-joined. ``/reset`` starts over."""
    prompter = job.prompter
    history: list[str] = []
    dialog = prompter.dialog and prompter.direction == "forward"
    print(f"ami-generate: {'chatting' if dialog else 'translating'}; an empty line answers nothing, "
          f"{RESET + ' forgets the conversation, ' if dialog else ''}Ctrl-D ends", file=sys.stderr, flush=True)
    vocab = prompter.exported.vocab
    number = 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        raw = sys.stdin.buffer.readline()
        if not raw:
            print(file=sys.stderr)
            return
        number += 1
        try:
            line = decode_line(raw, "<stdin>", number)
        except UserError as e:  # a typing accident does not end the conversation
            warn(f"{e}; line ignored")
            continue
        if dialog and line.strip() == RESET:
            history.clear()
            print("(conversation forgotten)", file=sys.stderr, flush=True)
            continue
        if dialog and line.strip():
            history += prompter.turns(line)
            source = prompter.context(history)
        else:  # a translation; or an empty line: an empty answer, and the conversation as it was
            source = prompter.source(line)
        (hyps,) = decode_all(job.strategy, job.model, job.other, [prompter.ids(source, f"<stdin>:{number}")], vocab,
                             1, first_index=number - 1)
        writer.write(number, hyps)
        answer = " ".join(tokenize(vocab.decode(hyps[0].tokens)))
        if dialog and answer:
            history.append(answer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="ami-generate", description=__doc__.split("\n\n")[0],
               epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported model (ami-export RUN_DIR)")
    p.add_argument("--input", default="-", help="input lines (default -: standard input)")
    p.add_argument("--interactive", action="store_true",
                   help="prompt for each line and answer it at once; a dialog model keeps the conversation")
    p.add_argument("--persona", action="append", metavar="TEXT",
                   help="a persona line, for a model trained with data.include_persona (repeat for several)")
    p.add_argument("--direction", choices=("forward", "backward"), default="forward",
                   help="backward: generate sources from targets with the backward network")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 with no --sample and no --rerank: greedy)")
    p.add_argument("--n_best", type=int, help="outputs written per input (default: 1; with --sample, --num_samples)")
    p.add_argument("--length_penalty", type=float, default=0.0, help="GNMT length penalty α (beam search)")
    p.add_argument("--sample", action="store_true", help="sample instead of searching")
    p.add_argument("--num_samples", type=int, default=1, help="samples drawn per input")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of mass >= p, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with the line number, it fixes each sample)")
    p.add_argument("--rerank", choices=("none", "mmi", "backward"), default="none",
                   help="rerank the beam or the samples with the other network")
    p.add_argument("--mmi_alpha", type=float, default=0.5, help="weight of log q(S|T) in mmi reranking")
    p.add_argument("--mmi_gamma", type=float, default=0.0, help="length bonus per token in mmi reranking")
    p.add_argument("--max_len_a", type=float, help="outputs end after a·|S| + b tokens (default: the run's eval.*)")
    p.add_argument("--max_len_b", type=int, help="see --max_len_a")
    p.add_argument("--batch_size", type=int, default=32, help="input lines decoded together")
    p.add_argument("--scores", action="store_true", help="write LINE<TAB>SCORE<TAB>TEXT even for one output")
    args = p.parse_args(argv)
    for name in ("beam", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        p.error(f"--top_k must be >= 0, got {args.top_k}")
    if args.max_len_b is not None and args.max_len_b < 1:
        p.error(f"--max_len_b must be >= 1, got {args.max_len_b}")
    if args.max_len_a is not None and args.max_len_a < 0:
        p.error(f"--max_len_a must be >= 0, got {args.max_len_a}")
    pool = args.num_samples if args.sample else args.beam
    args.n_best = args.n_best if args.n_best is not None else (args.num_samples if args.sample else 1)
    if not 1 <= args.n_best <= pool:
        p.error(f"--n_best must be between 1 and {'--num_samples' if args.sample else '--beam'} ({pool}), "
                f"got {args.n_best}")
    if args.rerank != "none" and pool < 2:
        p.error("--rerank needs candidates to reorder: --beam >= 2, or --sample with --num_samples >= 2")
    if args.sample and (args.beam != 1 or args.length_penalty):
        p.error("--beam and --length_penalty are for beam search, not --sample")
    args.tabular = args.scores or args.n_best > 1
    return args


@command
def main(argv: list[str] | None = None) -> int:
    generate(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
