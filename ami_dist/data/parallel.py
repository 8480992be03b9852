"""Aligned parallel text: line i of the source file translates line i of the target file."""

from __future__ import annotations

from pathlib import Path

from ami_dist.data.textio import read_lines
from ami_dist.errors import DataError


def read_parallel(src_path: str | Path, tgt_path: str | Path, max_chars: int | None = None) -> list[tuple[str, str]]:
    """(source, target) sentence pairs from two aligned files; mismatched line counts are an error.

    Every line must hold a sentence: an empty line, or one longer than ``max_chars``, is a DataError
    naming the file and line (see :func:`read_lines`).
    """
    src = read_lines(src_path, max_chars=max_chars)
    tgt = read_lines(tgt_path, max_chars=max_chars)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
            "source and target files must be aligned line by line"
        )
    return list(zip(src, tgt, strict=True))
