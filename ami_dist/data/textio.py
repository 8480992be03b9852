"""Strict reading of UTF-8 text files: every problem is a DataError naming the file and line.

:func:`iter_lines` streams a file in constant memory (the prepare step reads corpora of millions of lines
with it); :func:`read_lines` is the same check for files small enough to hold, such as validation sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ami_dist.errors import DataError

_CHUNK = 1 << 20


def open_text_file(path: str | Path) -> BinaryIO:
    """``path`` opened for reading bytes; a missing file or a directory is a DataError naming it."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None


def decode_line(raw: bytes, name: str | Path, number: int) -> str:
    """Line ``number`` of ``name`` as text, without its line ending; invalid UTF-8 or a NUL byte is a DataError
    naming the line and column."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}:{number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    line = line.removesuffix("\n").removesuffix("\r")
    if "\x00" in line:  # valid UTF-8, but never text: a binary file or a corrupted copy
        raise DataError(f"{name}:{number}: NUL byte at column {line.index(chr(0)) + 1} (a binary or corrupted file?)")
    return line


def _rest_is_blank(f) -> bool:
    while chunk := f.read(_CHUNK):
        if chunk.strip():
            return False
    return True


def iter_lines(path: str | Path, *, allow_empty_lines: bool = False, max_chars: int | None = None) -> Iterator[str]:
    """The lines of a UTF-8 text file without their line endings, one at a time.

    Raises DataError for a missing or empty (all-whitespace) file, invalid UTF-8 or a NUL byte (with the
    line and column it is on), unless ``allow_empty_lines`` a blank line, and with ``max_chars`` a line longer than that
    many characters (``data.max_line_chars``: a sign of text that was never split into sentences, or of a
    wrong file). Lines end at ``\\n`` only; a ``\\r`` before it is dropped.
    """
    f = open_text_file(path)
    with f:
        seen_text = False
        number = 0
        for number, raw in enumerate(f, start=1):
            line = decode_line(raw, path, number)
            if not line.strip():
                if not allow_empty_lines:
                    if not seen_text and _rest_is_blank(f):
                        raise DataError(f"{path}: file is empty")
                    raise DataError(f"{path}:{number}: empty line (every line must hold a sentence)")
            else:
                seen_text = True
            if max_chars is not None and len(line) > max_chars:
                raise DataError(f"{path}:{number}: line of {len(line)} characters is longer than "
                                f"data.max_line_chars = {max_chars} (text not split into sentences, or the "
                                "wrong file?)")
            yield line
        if not seen_text:
            raise DataError(f"{path}: file is empty")


def read_lines(path: str | Path, *, allow_empty_lines: bool = False, max_chars: int | None = None) -> list[str]:
    """Every line of ``path``, checked as :func:`iter_lines` checks them."""
    return list(iter_lines(path, allow_empty_lines=allow_empty_lines, max_chars=max_chars))


def count_lines(path: str | Path) -> int:
    """How many lines :func:`iter_lines` yields for ``path`` (counted on bytes, without decoding)."""
    count, last = 0, b"\n"
    with open_text_file(path) as f:
        while chunk := f.read(_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")
