"""Strict reading of UTF-8 text files: every problem is a DataError naming the file and line."""

from __future__ import annotations

from pathlib import Path

from ami_dist.errors import DataError


def read_lines(path: str | Path, *, allow_empty_lines: bool = False, max_chars: int | None = None) -> list[str]:
    """The lines of a UTF-8 text file without their line endings.

    Raises DataError for a missing or empty file, invalid UTF-8 (with the line it is on), unless
    ``allow_empty_lines`` a blank line, and with ``max_chars`` a line longer than that many characters
    (``data.max_line_chars``: a sign of text that was never split into sentences, or of a wrong file).
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [line.removesuffix("\r") for line in lines]
    for number, line in enumerate(lines, start=1):
        if not allow_empty_lines and not line.strip():
            raise DataError(f"{path}:{number}: empty line (every line must hold a sentence)")
        if max_chars is not None and len(line) > max_chars:
            raise DataError(f"{path}:{number}: line of {len(line)} characters is longer than data.max_line_chars "
                            f"= {max_chars} (text not split into sentences, or the wrong file?)")
    return lines
