"""TQDM_DISABLE turns every progress bar off, though the trainer passes ``disable`` for each (tqdm would let it win)."""

from __future__ import annotations

import pytest

from ami_dist.progress import progress_bar


@pytest.mark.parametrize(("value", "show", "disabled"), [
    (None, True, False), (None, False, True), ("1", True, True), ("true", True, True), ("0", True, False),
    ("", True, False)])
def test_tqdm_disable_is_honoured(monkeypatch, value: str | None, show: bool, disabled: bool) -> None:
    if value is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", value)
    bar = progress_bar(show, total=3)
    assert bar.disable is disabled
    bar.close()
