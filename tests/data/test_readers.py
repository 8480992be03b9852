"""Readers of parallel text and PersonaChat dialogs: the happy path and errors naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ami_dist.data.dialog import TURN_SEPARATOR, dialog_pairs, read_personachat, tokenize
from ami_dist.data.parallel import read_parallel
from ami_dist.data.textio import read_lines
from ami_dist.errors import DataError
from tests.conftest import DATA


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_bundled_parallel_sample_is_aligned() -> None:
    pairs = read_parallel(DATA / "tatoeba_en_de/train.en", DATA / "tatoeba_en_de/train.de")
    assert len(pairs) == 20000
    assert all(s and t for s, t in pairs)


def test_line_count_mismatch_names_both_files(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.en", "one\ntwo\nthree\n")
    tgt = _write(tmp_path / "a.de", "eins\nzwei\n")
    with pytest.raises(DataError, match=rf"{src} has 3 lines but {tgt} has 2"):
        read_parallel(src, tgt)


def test_invalid_utf8_names_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.en", b"fine\nalso fine\nbro\xffken\n")
    with pytest.raises(DataError, match=rf"{path}:3: invalid UTF-8 \(byte 0xff at column 4\)"):
        read_lines(path)


def test_a_nul_byte_names_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.en", b"fine\nhalf\x00way\n")
    with pytest.raises(DataError, match=rf"{path}:2: NUL byte at column 5"):
        read_lines(path)


def test_empty_file_and_empty_line(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.en", "")
    with pytest.raises(DataError, match=rf"{empty}: file is empty"):
        read_lines(empty)
    gap = _write(tmp_path / "gap.en", "one\n\nthree\n")
    with pytest.raises(DataError, match=rf"{gap}:2: empty line"):
        read_lines(gap)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_lines(tmp_path / "nope.txt")


def test_crlf_and_missing_final_newline_are_accepted(tmp_path: Path) -> None:
    assert read_lines(_write(tmp_path / "x", "a b\r\nc d")) == ["a b", "c d"]


def test_tokenize_splits_spaces_and_punctuation() -> None:
    assert tokenize("Hi, I'm Tom!  Don't go.") == ["Hi", ",", "I'm", "Tom", "!", "Don't", "go", "."]
    # tokenising tokenised text changes nothing (the vocabulary re-tokenises dialog sources)
    text = "i'm ok , thanks <sep> you ?"
    assert " ".join(tokenize(text)) == text


DIALOG = (
    "1 your persona: i like cats.\n"
    "2 your persona: i live in paris.\n"
    "3 hi there!\thello , how are you ?\n"
    "4 good, you?\tgreat . i have a cat .\n"
    "5 nice.\twhat do you do ?\t\tcand a|cand b\n"
    "1 your persona: i am tall.\n"
    "2 hello\thi !\n"
)


def test_personachat_pairs_keep_last_three_turns(tmp_path: Path) -> None:
    episodes = read_personachat(_write(tmp_path / "d.txt", DIALOG))
    assert len(episodes) == 2
    assert episodes[0].persona == ["i like cats.", "i live in paris."]
    pairs = dialog_pairs(episodes, max_history_turns=3)
    assert [t for _, t in pairs] == ["hello , how are you ?", "great . i have a cat .", "what do you do ?", "hi !"]
    sep = f" {TURN_SEPARATOR} "
    assert pairs[0][0] == "hi there !"
    # the third turn sees only the last 3 utterances: partner, response, partner
    assert pairs[2][0] == sep.join(["good , you ?", "great . i have a cat .", "nice ."])
    with_persona = dialog_pairs(episodes, max_history_turns=1, include_persona=True)
    assert with_persona[0][0] == sep.join(["i like cats . i live in paris .", "hi there !"])


def test_bundled_personachat_parses() -> None:
    episodes = read_personachat(DATA / "personachat/train.txt")
    assert len(episodes) == 800
    pairs = dialog_pairs(episodes)
    assert len(pairs) == sum(len(e.turns) for e in episodes)
    assert all(src.count(TURN_SEPARATOR) <= 2 for src, _ in pairs)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("1 your persona: x\nhello\tthere\n", 2, "expected '<turn number> <text>'"),
        ("1 your persona: x\n2 a\tb\n4 c\td\n", 3, "turn number 4 breaks the numbering"),
        ("2 a\tb\n", 1, "turn number 2 breaks the numbering"),
        ("1 your persona: x\n2 no response here\n", 2, "expected 'partner message<TAB>response'"),
        ("1 a\tb\n2 your persona: late\n", 2, "persona line after the dialog turns began"),
    ],
)
def test_broken_dialog_files_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = _write(tmp_path / "d.txt", text)
    with pytest.raises(DataError, match=rf"{path}:{line}: {message}"):
        read_personachat(path)


def test_dialog_without_turns(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "1 your persona: x\n2 your persona: y\n")
    with pytest.raises(DataError, match=rf"{path}:1: dialog has persona lines but no turns"):
        read_personachat(path)
