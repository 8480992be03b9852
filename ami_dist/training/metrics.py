"""Text metrics computed on decoded outputs (sacreBLEU and chrF come from sacrebleu itself)."""

from __future__ import annotations


def distinct_n(sentences: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / all n-grams over the whole output, tokens split on spaces."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for sentence in sentences:
        tokens = sentence.split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def mean_length(sentences: list[str]) -> float:
    """Mean number of space-separated tokens per sentence."""
    return sum(len(s.split()) for s in sentences) / len(sentences) if sentences else 0.0
