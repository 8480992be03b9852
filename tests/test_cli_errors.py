"""Bad input through the real command line: one 'ami-dist: error:' line naming file/line/key, exit 2,
no traceback, and (for mistakes caught before training starts) nothing written."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DATA, PYTHON, ROOT, subprocess_env, tiny_config, write_config

Setup = Callable[[Path, dict], list[str]]


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def _mismatched_lines(tmp: Path, cfg: dict) -> list[str]:
    cfg["data"]["train_tgt"] = _write(tmp / "short.de", "eins\nzwei\n")
    return []


def _empty_file(tmp: Path, cfg: dict) -> list[str]:
    cfg["data"]["valid_src"] = _write(tmp / "empty.en", "")
    return []


def _invalid_utf8(tmp: Path, cfg: dict) -> list[str]:
    lines = (DATA / "tatoeba_en_de/valid.en").read_bytes().split(b"\n")
    lines[41] = b"caf\xe9 latin-1"
    cfg["data"]["valid_src"] = _write(tmp / "latin1.en", b"\n".join(lines))
    return []


def _broken_dialog(tmp: Path, cfg: dict) -> list[str]:
    cfg["data"] = {"format": "personachat", "train_file": str(DATA / "personachat/train.txt"),
                   "valid_file": _write(tmp / "d.txt", "1 your persona: hi\n2 a\tb\n3 c\n")}
    cfg["vocab"] = {"kind": "words", "size": 500}
    return []


def _missing_data_file(tmp: Path, cfg: dict) -> list[str]:
    cfg["data"]["train_src"] = str(tmp / "missing.en")
    return []


def _unknown_key(tmp: Path, cfg: dict) -> list[str]:
    cfg["train"]["max_step"] = 3
    return []


def _missing_preset(tmp: Path, cfg: dict) -> list[str]:
    return ["--deepspeed_config", "configs/ds_zero9.json"]


def _indivisible_batch(tmp: Path, cfg: dict) -> list[str]:
    cfg["train"].update({"batch_size": 16, "grad_accum": 3})
    return []


def _bad_override(tmp: Path, cfg: dict) -> list[str]:
    return ["model.dropout=1.5"]


def _unknown_option(tmp: Path, cfg: dict) -> list[str]:
    return ["--learning-rate", "3"]


CASES: list[tuple[str, Setup, str]] = [
    ("mismatched line counts", _mismatched_lines, r"train\.en has 20000 lines but .*short\.de has 2"),
    ("empty file", _empty_file, r"empty\.en: file is empty"),
    ("invalid UTF-8", _invalid_utf8, r"latin1\.en:42: invalid UTF-8 \(byte 0xe9 at column 4\)"),
    ("dialog that does not parse", _broken_dialog, r"d\.txt:3: expected 'partner message<TAB>response'"),
    ("config points to a missing file", _missing_data_file,
     r"run\.yaml:\d+: data\.train_src: file not found: .*missing\.en"),
    ("unknown config key", _unknown_key, r"run\.yaml:\d+: train\.max_step: unknown key"),
    ("DeepSpeed preset that does not exist", _missing_preset, r"configs/ds_zero9\.json: DeepSpeed preset not found"),
    ("batch that does not divide", _indivisible_batch,
     r"train\.batch_size: 16 does not divide by world size 1 x train\.grad_accum 3"),
    ("out-of-range override", _bad_override, r"command line: model\.dropout: expected a value < 1"),
    ("unknown command-line option", _unknown_option, r"command line: unrecognized arguments: --learning-rate"),
]


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(name: str, setup: Setup, expected: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    extra = setup(tmp_path, cfg)
    config = write_config(tmp_path, cfg)
    proc = subprocess.run([PYTHON, "ami_dist/train.py", "--config", str(config), *extra], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ami-dist: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert re.search(expected, lines[0]), lines[0]
    # caught before training started: no run directory, no MLflow store
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_vocabulary_too_large_for_the_data_fails_cleanly(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, vocab={"size": 200000}, tracking={"enabled": True})
    proc = subprocess.run([PYTHON, "ami_dist/train.py", "--config", str(write_config(tmp_path, cfg))], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "ami-dist: error: vocab.size: sentencepiece cannot train a 200000-piece model" in proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert "vocab.size" in run.data.tags["failure_reason"]
