"""distinct-n and mean length on hand-computed examples."""

from __future__ import annotations

import pytest

from ami_dist.training.metrics import distinct_n, mean_length


def test_distinct_n_counts_unique_ngrams_over_all_outputs() -> None:
    outputs = ["i am ok", "i am fine", "ok"]
    # unigrams: i am ok i am fine ok -> 7 in all, {i, am, ok, fine} unique
    assert distinct_n(outputs, 1) == pytest.approx(4 / 7)
    # bigrams: (i am) (am ok) (i am) (am fine) -> 4 in all, 3 unique; "ok" has none
    assert distinct_n(outputs, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a", ""], 2) == 0.0  # no bigrams at all


def test_mean_length_in_tokens() -> None:
    assert mean_length(["a b c", "d", ""]) == pytest.approx(4 / 3)
    assert mean_length([]) == 0.0
