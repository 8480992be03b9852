"""Paired significance tests: the resampled distinct-n is distinct-n, and the tests tell alike from unlike."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from ami_dist.significance import NGrams, distinct_metric, mean_metric, paired_bootstrap, sacrebleu_paired
from ami_dist.training.metrics import distinct_n


def _sentences(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(0, 8))) for _ in range(n)]


def test_distinct_of_a_resample_is_distinct_n_of_those_sentences() -> None:
    rng = random.Random(0)
    sentences = _sentences(rng, 50, 12)
    grams = NGrams(sentences, 2)
    draw = np.random.default_rng(1)
    for _ in range(20):
        indices = draw.integers(0, 50, size=50)
        assert grams.distinct(indices) == pytest.approx(distinct_n([sentences[i] for i in indices], 2))


def test_alike_systems_are_not_significant_and_unlike_ones_are() -> None:
    rng = np.random.default_rng(0)
    sizes = [200, 200, 200]
    a = [rng.normal(-3.0, 1.0, n) for n in sizes]
    alike = paired_bootstrap(mean_metric, a, [x + rng.normal(0.0, 0.01, len(x)) for x in a], sizes)
    assert alike.p_value > 0.2 and alike.low < 0 < alike.high
    better = paired_bootstrap(mean_metric, a, [x + 0.2 + rng.normal(0.0, 0.5, len(x)) for x in a], sizes)
    assert better.p_value < 0.01 and better.difference == pytest.approx(0.2, abs=0.1) and better.low > 0
    worse = paired_bootstrap(mean_metric, [x + 0.2 for x in a], a, sizes)
    assert worse.p_value < 0.01 and worse.difference == pytest.approx(-0.2) and worse.high < 0


def test_more_varied_outputs_have_a_significantly_higher_distinct_n() -> None:
    rng = random.Random(3)
    dull = [NGrams(_sentences(rng, 300, 8), 2) for _ in range(3)]
    varied = [NGrams(_sentences(rng, 300, 60), 2) for _ in range(3)]
    result = paired_bootstrap(distinct_metric, dull, varied, [300] * 3)
    assert result.difference > 0.2 and result.p_value < 0.01


def test_sacrebleu_paired_reports_the_corpus_scores() -> None:
    rng = random.Random(5)
    refs = _sentences(rng, 100, 20)
    good = [r if i % 4 else "w1 w2" for i, r in enumerate(refs)]
    bad = [r if i % 2 else "w1 w2" for i, r in enumerate(refs)]
    scores = sacrebleu_paired(bad, good, refs)
    assert scores["BLEU"][0] == pytest.approx(BLEU().corpus_score(bad, [refs]).score)
    assert scores["BLEU"][1] == pytest.approx(BLEU().corpus_score(good, [refs]).score)
    assert scores["BLEU"][2] < 0.05 and scores["chrF"][1] > scores["chrF"][0]
    almost = [*good[:-1], "w3"]
    assert sacrebleu_paired(good, almost, refs)["BLEU"][2] > 0.05  # one sentence apart: not significant


def test_identical_systems_get_p_one() -> None:
    a = [np.arange(10.0)]
    assert paired_bootstrap(mean_metric, a, a, [10]).p_value == 1.0
