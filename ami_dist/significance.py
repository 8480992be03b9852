"""Paired significance tests between two systems' outputs on the same sentences, over one or more seeds.

BLEU and chrF use sacreBLEU's own paired bootstrap resampling (``sacrebleu.significance.PairedTest``, the
Moses procedure), one seed at a time. Distinct-n and per-sentence scores such as the fixed critic's
log q(S|T̂) use the same procedure here, stratified over seeds: each resample draws the sentences anew
within every seed (the same draw for both systems), and the statistic is the mean over seeds of the
difference B − A, so one test says whether B differs from A across seeds and sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 12345  # sacreBLEU's default (SACREBLEU_SEED)


@dataclass(frozen=True)
class Comparison:
    difference: float  # mean over seeds of metric(B) − metric(A)
    p_value: float  # two-sided: the chance of a difference this large if the systems were alike
    low: float  # 95% interval of the difference over the resamples
    high: float


def _p_value(resampled: np.ndarray, observed: float) -> float:
    """Centred bootstrap p-value, as sacreBLEU computes it, (#{|d* − mean d*| ≥ |d|} + 1) / (n + 1), but with ≥
    where sacreBLEU has >, so that two identical systems get p = 1 rather than the smallest p there is."""
    centred = np.abs(resampled - resampled.mean())
    return float((np.sum(centred >= abs(observed)) + 1) / (len(resampled) + 1))


def paired_bootstrap(metric: Callable[[object, np.ndarray], float], system_a: Sequence[object],
                     system_b: Sequence[object], sizes: Sequence[int], resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> Comparison:
    """Compare B with A: ``system_a[s]`` / ``system_b[s]`` are seed s's outputs of ``sizes[s]`` sentences, and
    ``metric(outputs, indices)`` scores the sentences ``indices`` of one system's outputs."""
    if not (len(system_a) == len(system_b) == len(sizes)) or not sizes:
        raise ValueError("paired_bootstrap needs the same seeds for both systems")
    rng = np.random.default_rng(seed)
    observed = float(np.mean([metric(b, np.arange(n)) - metric(a, np.arange(n))
                              for a, b, n in zip(system_a, system_b, sizes, strict=True)]))
    draws = [rng.integers(0, n, size=(resamples, n)) for n in sizes]
    resampled = np.array([np.mean([metric(b, d[r]) - metric(a, d[r])
                                   for a, b, d in zip(system_a, system_b, draws, strict=True)])
                          for r in range(resamples)])
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Comparison(observed, _p_value(resampled, observed), float(low), float(high))


class NGrams:
    """A system's n-grams, indexed for fast distinct-n of any resample of its sentences."""

    def __init__(self, sentences: Sequence[str], n: int) -> None:
        ids: dict[tuple[str, ...], int] = {}
        grams: list[int] = []
        counts = np.zeros(len(sentences), dtype=np.int64)
        for i, sentence in enumerate(sentences):
            tokens = sentence.split()
            for j in range(len(tokens) - n + 1):
                grams.append(ids.setdefault(tuple(tokens[j : j + n]), len(ids)))
            counts[i] = max(len(tokens) - n + 1, 0)
        self.grams = np.array(grams, dtype=np.int64)
        self.counts = counts
        self.owner = np.repeat(np.arange(len(sentences)), counts)

    def distinct(self, indices: np.ndarray) -> float:
        """Distinct-n of the sentences ``indices`` (with repeats): unique n-grams / all n-grams."""
        times = np.bincount(indices, minlength=len(self.counts))
        total = int((times * self.counts).sum())
        if total == 0:
            return 0.0
        return len(np.unique(self.grams[times[self.owner] > 0])) / total


def distinct_metric(outputs: object, indices: np.ndarray) -> float:
    """``metric`` for :func:`paired_bootstrap` over :class:`NGrams`."""
    assert isinstance(outputs, NGrams)
    return outputs.distinct(indices)


def mean_metric(outputs: object, indices: np.ndarray) -> float:
    """``metric`` for :func:`paired_bootstrap` over per-sentence numbers (an array)."""
    return float(np.asarray(outputs)[indices].mean())


def sacrebleu_paired(hyps_a: Sequence[str], hyps_b: Sequence[str], refs: Sequence[str], tokenize: str = "13a",
                     resamples: int = DEFAULT_RESAMPLES) -> dict[str, tuple[float, float, float]]:
    """sacreBLEU's paired bootstrap of B against A: {"BLEU"/"chrF": (score A, score B, p-value)}."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    test = PairedTest([("A", list(hyps_a)), ("B", list(hyps_b))], {"BLEU": BLEU(tokenize=tokenize), "chrF": CHRF()},
                      [list(refs)], test_type="bs", n_samples=resamples)
    _, scores = test()
    out = {}
    for name, results in scores.items():
        if name == "System":
            continue
        key = "BLEU" if name.startswith("BLEU") else "chrF"
        out[key] = (results[0].score, results[1].score, results[1].p_value)
    return out
