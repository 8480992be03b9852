"""Progress bars: shown where asked for, unless ``TQDM_DISABLE`` says otherwise.

tqdm reads ``TQDM_DISABLE`` only as the default of ``disable``; the trainer passes ``disable`` for every bar
(rank 0 shows it, the others do not), so the variable alone would never take effect.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm


def disabled_by_environment() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(show: bool, **kwargs: Any) -> tqdm:
    """``tqdm(**kwargs)``, shown where ``show`` is true and ``TQDM_DISABLE`` is not set."""
    return tqdm(disable=not show or disabled_by_environment(), **kwargs)
