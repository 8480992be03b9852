"""Ranking validations for keep-best and early stopping (``ami_dist.training.selection``), on hand-made histories."""

from __future__ import annotations

import math

from ami_dist.training.selection import Selection


def _fed(select: str, keep: int, patience: int, values: list[float | None]) -> tuple[Selection, list[bool]]:
    selection = Selection(select, keep, patience)
    joined = [selection.record(2 * (i + 1), v) for i, v in enumerate(values)]
    return selection, joined


def test_bleu_keeps_the_highest_and_says_which_steps_to_save() -> None:
    selection, joined = _fed("bleu", 2, 0, [10, 20, 15, 30, 25, 24])
    assert joined == [True, True, True, True, True, False]
    assert selection.best == [(8, 30), (10, 25)]
    assert selection.kept_tags() == ["step8", "step10"]
    assert selection.best_so_far == (8, 30)


def test_perplexity_keeps_the_lowest() -> None:
    selection, joined = _fed("ppl", 2, 0, [50, 40, 45, 60, 38])
    assert selection.best == [(10, 38), (4, 40)]
    assert joined == [True, True, True, False, True]
    assert selection.metric == "valid/fw_ppl"


def test_ties_keep_the_earlier_checkpoint() -> None:
    selection, joined = _fed("bleu", 1, 2, [5, 5, 5])
    assert selection.best == [(2, 5)] and joined == [True, False, False]
    assert selection.since_best == 2 and selection.exhausted  # an equal value is no improvement


def test_early_stopping_counts_validations_since_the_best() -> None:
    selection, _ = _fed("bleu", 0, 3, [10, 20, 15, 30, 25, 24])
    assert selection.since_best == 2 and not selection.exhausted
    selection.record(14, 23)
    assert selection.since_best == 3 and selection.exhausted
    assert "valid/fw_bleu has not improved on 30.0000 (step 8) for 3 validations" in selection.stop_reason()
    selection.record(16, 31)
    assert selection.since_best == 0 and not selection.exhausted
    assert not Selection("bleu", 0, 0).exhausted


def test_missing_and_nan_values_count_for_nothing() -> None:
    selection, joined = _fed("mi_logq_fixed", 2, 1, [None, math.nan, -3.0, None])
    assert joined == [False, False, True, False]
    assert selection.history == [(6, -3.0)] and selection.since_best == 0


def test_state_round_trip_and_a_changed_metric_starts_afresh() -> None:
    selection, _ = _fed("bleu", 3, 2, [10, 20, 15])
    again = Selection("bleu", 2, 2)  # keep_best lowered on resume: the worst drops out
    again.load_state_dict(selection.state_dict())
    assert again.history == selection.history and again.best == [(4, 20), (6, 15)]
    other = Selection("ppl", 2, 2)
    other.load_state_dict(selection.state_dict())
    assert other.history == [] and other.best == []
    a_step_validated_twice = Selection("bleu", 2, 0)  # a resumed run validates its checkpoint's step again
    a_step_validated_twice.record(4, 10)
    a_step_validated_twice.record(4, 12)
    assert a_step_validated_twice.history == [(4, 12)] and a_step_validated_twice.best == [(4, 12)]
