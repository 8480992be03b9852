"""Decoding speed: sentences per second for greedy, beam 5, beam 5 + MMI reranking and sampling, batched against
one sentence at a time, through the code ami-generate and ami-evaluate decode with (``decode_all``).

    .venv/bin/python benchmarks/decode_speed.py                       # the demo model and the paper's dialog LSTM
    .venv/bin/python benchmarks/decode_speed.py --demo_model model.pt --sentences 64 --skip paper

Models: ``demo`` is an exported ``make demo`` run (``--demo_model``; by default the newest
``runs/nmt-demo-*/model.pt``, written by ``ami-export RUN_DIR``), decoding the bundled Tatoeba test sentences;
``paper`` is the paper's dialog LSTM (``configs/dialog_lstm.yaml``: 2×500, general attention, input feeding)
over a word vocabulary of the bundled PersonaChat sample, decoding its validation contexts. The paper's LSTM
has untrained weights (training it is hours on this CPU): its outputs rarely end before the length limit, so
its figures are for the longest outputs a source allows (``1.5·|S| + 10`` tokens), where batching loses nothing
to finished rows — they bound the speed-up from above, the demo's trained lengths are the realistic case.

Every mode decodes the same sentences batched (``--batch_size``, length-sorted as decode_all does) and one at a
time, in the same process, alternating, ``--repeats`` times; the figures are medians. Goals (issue 18): batched
beam 5 at least 5× faster than unbatched; MMI reranking adds at most 50% to beam 5 (both batched).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ami_dist.data.dialog import dialog_pairs, read_personachat  # noqa: E402
from ami_dist.data.textio import read_lines  # noqa: E402
from ami_dist.data.vocab import Vocab, WordVocab  # noqa: E402
from ami_dist.decoding.rerank import Reranker  # noqa: E402
from ami_dist.decoding.strategy import Strategy, decode_all  # noqa: E402
from ami_dist.models import build_model  # noqa: E402
from ami_dist.models.seq2seq import Seq2Seq  # noqa: E402

MODES: dict[str, Strategy] = {
    "greedy": Strategy("greedy", scored=False),
    "beam 5": Strategy("beam", beam=5, pool=1),
    "beam 5 + MMI": Strategy("beam", beam=5, pool=5, rerank=Reranker("mmi", 0.5, 0.0)),
    "sampling (top-p 0.9)": Strategy("sample", top_p=0.9, seed=1),
}


def demo_model(path: str | None) -> tuple[str, Seq2Seq, Seq2Seq, Vocab, list[list[int]], Path]:
    from ami_dist.export import load_exported

    if path is None:
        found = sorted(ROOT.glob("runs/nmt-demo-*/model.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit("no demo model: run `make demo`, then `.venv/bin/ami-export runs/nmt-demo-<time>`, "
                             "or pass --demo_model FILE (or --skip demo)")
        path = str(found[-1])
    exported = load_exported(path)
    sentences = read_lines(ROOT / "data/tatoeba_en_de/test.en")
    sources = [exported.vocab.encode(s) for s in sentences]
    return "demo (trained)", exported.networks["forward"], exported.networks["backward"], exported.vocab, sources, \
        Path(path)


def paper_dialog_lstm() -> tuple[str, Seq2Seq, Seq2Seq, Vocab, list[list[int]], Path]:
    from ami_dist.config import load_config

    cfg = load_config(ROOT / "configs/dialog_lstm.yaml", check_files=False)
    train = dialog_pairs(read_personachat(ROOT / cfg.data.train_file), cfg.data.max_history_turns)
    vocab = WordVocab.train([text for pair in train for text in pair], cfg.vocab.size)
    valid = dialog_pairs(read_personachat(ROOT / cfg.data.valid_file), cfg.data.max_history_turns)
    sources = [vocab.encode(src)[: cfg.data.max_src_len] for src, _ in valid]
    networks = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        networks.append(build_model(cfg.model, len(vocab), vocab.pad_id).eval())
    return (f"paper dialog LSTM (untrained, {len(vocab)} words)", networks[0], networks[1], vocab, sources,
            ROOT / "configs/dialog_lstm.yaml")


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(model: Seq2Seq, other: Seq2Seq, vocab: Vocab, sources: list[list[int]], batch_size: int,
            repeats: int) -> dict[str, tuple[float, float]]:
    """Per mode: (sentences/s batched, sentences/s one at a time), medians over ``repeats``."""
    results = {}
    for name, strategy in MODES.items():
        batched, single = [], []
        for _ in range(repeats):
            batched.append(timed(lambda s=strategy: decode_all(s, model, other, sources, vocab, batch_size)))
            single.append(timed(lambda s=strategy: decode_all(s, model, other, sources, vocab, 1)))
        n = len(sources)
        results[name] = (n / statistics.median(batched), n / statistics.median(single))
        print(f"    {name}: {results[name][0]:.1f} vs {results[name][1]:.1f} sentences/s", flush=True)
    return results


def table(title: str, source: Path, n: int, results: dict[str, tuple[float, float]], batch_size: int) -> str:
    lines = [f"{title}: {n} sentences ({source.name}), batch {batch_size}, {torch.get_num_threads()} threads",
             "", "| mode | batched (sent/s) | one at a time (sent/s) | batched / one at a time |",
             "| --- | ---: | ---: | ---: |"]
    for name, (batched, single) in results.items():
        lines.append(f"| {name} | {batched:.1f} | {single:.1f} | {batched / single:.1f}x |")
    beam, mmi = results["beam 5"][0], results["beam 5 + MMI"][0]
    speedup = results["beam 5"][0] / results["beam 5"][1]
    lines += ["", f"batched beam 5 is {speedup:.1f}x unbatched (goal >= 5x: {'met' if speedup >= 5 else 'NOT met'}); "
              f"MMI reranking adds {100 * (beam / mmi - 1):.0f}% to batched beam 5 (goal <= 50%: "
              f"{'met' if beam / mmi - 1 <= 0.5 else 'NOT met'})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_model", help="an exported make-demo model (default: the newest "
                        "runs/nmt-demo-*/model.pt)")
    parser.add_argument("--sentences", type=int, default=128, help="sentences decoded per mode and model")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", choices=("demo", "paper"), action="append", default=[])
    args = parser.parse_args()
    torch.manual_seed(0)
    reports = []
    for key, build in (("demo", lambda: demo_model(args.demo_model)), ("paper", paper_dialog_lstm)):
        if key in args.skip:
            continue
        title, model, other, vocab, sources, origin = build()
        sources = sources[: args.sentences]
        print(f"{title}:", flush=True)
        results = measure(model, other, vocab, sources, args.batch_size, args.repeats)
        reports.append(table(title, origin, len(sources), results, args.batch_size))
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
