"""Bad input through the real command line: one 'ami-dist: error:' line naming file/line/key, exit 2,
no traceback, and (for mistakes caught before training starts) nothing written; a bad checkpoint leaves
the run directory it sits in, and the run's MLflow history, as they were."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, PYTHON, ROOT, subprocess_env, tiny_config, write_config
from tests.finished_run import Exploit, run_in

Setup = Callable[[Path, dict], list[str]]
NO_CONFIG = "<no --config>"  # a setup whose arguments start with this runs without the default --config


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def _valid_lines(side: str) -> list[str]:
    return (DATA / f"tatoeba_en_de/valid.{side}").read_text(encoding="utf-8").splitlines()


# --- data files ---------------------------------------------------------------------------------------

def _mismatched_lines(tmp: Path, cfg: dict) -> list[str]:
    cfg["data"]["train_tgt"] = _write(tmp / "short.de", "eins\nzwei\n")
    return []


def _empty_file(tmp: Path, cfg: dict) -> list[str]:
    cfg["data"]["valid_src"] = _write(tmp / "empty.en", "")
    return []


def _empty_line(tmp: Path, cfg: dict) -> list[str]:
    lines = _valid_lines("de")
    lines[4] = "   "
    cfg["data"]["valid_tgt"] = _write(tmp / "gap.de", "\n".join(lines) + "\n")
    return []


def _invalid_utf8(tmp: Path, cfg: dict) -> list[str]:
    lines = (DATA / "tatoeba_en_de/valid.en").read_bytes().split(b"\n")
    lines[41] = b"caf\xe9 latin-1"
    cfg["data"]["valid_src"] = _write(tmp / "latin1.en", b"\n".join(lines))
    return []


def _nul_byte(tmp: Path, cfg: dict) -> list[str]:
    lines = (DATA / "tatoeba_en_de/valid.de").read_bytes().split(b"\n")
    lines[9] = b"ka\x00putt"
    cfg["data"]["valid_tgt"] = _write(tmp / "corrupt.de", b"\n".join(lines))
    return []


def _not_a_checkpoint(tmp: Path, cfg: dict) -> list[str]:
    (tmp / "mle" / "checkpoints" / "forward").mkdir(parents=True)
    cfg["ami"] = {"init_forward": str(tmp / "mle" / "checkpoints" / "forward")}
    return []


def _overlong_sentence(tmp: Path, cfg: dict) -> list[str]:
    lines = _valid_lines("en")
    lines[6] = " ".join(lines[:400])  # a paragraph, not a sentence: 17,000+ characters
    cfg["data"]["valid_src"] = _write(tmp / "paragraph.en", "\n".join(lines) + "\n")
    return []


def _missing_split(tmp: Path, cfg: dict) -> list[str]:
    del cfg["data"]["valid_src"], cfg["data"]["valid_tgt"]
    return []


def _missing_data_file(tmp: Path, cfg: dict) -> list[str]:
    cfg["data"]["train_src"] = str(tmp / "missing.en")
    return []


def _dialog_config(cfg: dict, valid_file: str) -> None:
    cfg["data"] = {"format": "personachat", "train_file": str(DATA / "personachat/train.txt"),
                   "valid_file": valid_file}
    cfg["vocab"] = {"kind": "words", "size": 500}


def _broken_dialog(tmp: Path, cfg: dict) -> list[str]:
    _dialog_config(cfg, _write(tmp / "d.txt", "1 your persona: hi\n2 a\tb\n3 c\n"))
    return []


def _broken_turn_numbering(tmp: Path, cfg: dict) -> list[str]:
    _dialog_config(cfg, _write(tmp / "d.txt", "1 your persona: i like tea.\n2 hi\thello !\n4 how are you?\tfine .\n"))
    return []


def _dialog_not_utf8(tmp: Path, cfg: dict) -> list[str]:
    _dialog_config(cfg, _write(tmp / "d.txt", b"1 your persona: i like tea.\n2 s\xfc\xdf\thello !\n"))
    return []


def _prepared(tmp: Path, cfg: dict) -> Path:
    """The tiny config's corpus prepared into ``tmp/prepared``; the config then trains on it."""
    from ami_dist.config import load_config
    from ami_dist.data.prepare import prepare

    raw = dict(cfg, data={**cfg["data"], "cache_dir": str(tmp / "cache")})
    root = prepare(load_config(write_config(tmp, raw, "raw.yaml"), []), tmp / "prepared", show=False)
    cfg["data"] = {"prepared": str(root), "valid_limit": cfg["data"]["valid_limit"]}
    return root


def _truncated_prepared_dir(tmp: Path, cfg: dict) -> list[str]:
    ids = _prepared(tmp, cfg) / "train.tgt.bin"
    ids.write_bytes(ids.read_bytes()[:1000])
    return []


def _mismatched_prepared_dir(tmp: Path, cfg: dict) -> list[str]:
    _prepared(tmp, cfg)
    cfg["data"]["lowercase"] = True
    return []


# --- recipes and DeepSpeed presets --------------------------------------------------------------------

def _unknown_key(tmp: Path, cfg: dict) -> list[str]:
    cfg["train"]["max_step"] = 3
    return []


def _unknown_section(tmp: Path, cfg: dict) -> list[str]:
    cfg["optimizer"] = {"lr": 0.1}
    return []


def _wrong_type(tmp: Path, cfg: dict) -> list[str]:
    cfg["train"]["batch_size"] = "sixteen"
    return []


def _out_of_range(tmp: Path, cfg: dict) -> list[str]:
    cfg["train"]["label_smoothing"] = 1.5
    return []


def _yaml_syntax_error(tmp: Path, cfg: dict) -> list[str]:
    _write(tmp / "run.yaml", "run:\n  name: x\ntrain:\n  batch_size: [16,\n  mle_steps: 3\n")
    return []


def _not_a_mapping(tmp: Path, cfg: dict) -> list[str]:
    _write(tmp / "run.yaml", "- run\n- train\n")
    return []


def _duplicate_key(tmp: Path, cfg: dict) -> list[str]:
    text = write_config(tmp, cfg).read_text(encoding="utf-8")
    _write(tmp / "run.yaml", text.replace("  mle_steps: 10\n", "  mle_steps: 10\n  mle_steps: 20\n"))
    return []


def _missing_preset(tmp: Path, cfg: dict) -> list[str]:
    return ["--deepspeed_config", "configs/ds_zero9.json"]


def _invalid_preset_json(tmp: Path, cfg: dict) -> list[str]:
    return ["--deepspeed_config", _write(tmp / "preset.json", '{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')]


def _unknown_zero_stage(tmp: Path, cfg: dict) -> list[str]:
    return ["--deepspeed_config", _write(tmp / "zero5.json", json.dumps({"zero_optimization": {"stage": 5}}))]


def _indivisible_batch(tmp: Path, cfg: dict) -> list[str]:
    cfg["train"].update({"batch_size": 16, "grad_accum": 3})
    return []


# --- command line -------------------------------------------------------------------------------------

def _bad_override(tmp: Path, cfg: dict) -> list[str]:
    return ["model.dropout=1.5"]


def _override_without_value(tmp: Path, cfg: dict) -> list[str]:
    return ["train.mle_steps"]


def _override_of_unknown_key(tmp: Path, cfg: dict) -> list[str]:
    return ["train.max_stepz=5"]


def _override_replacing_a_section(tmp: Path, cfg: dict) -> list[str]:
    return ["model=3"]


def _unknown_option(tmp: Path, cfg: dict) -> list[str]:
    return ["--learning-rate", "3"]


def _no_config(tmp: Path, cfg: dict) -> list[str]:
    return [NO_CONFIG, "train.mle_steps=3"]


def _resume_of_a_non_run_dir(tmp: Path, cfg: dict) -> list[str]:
    (tmp / "not_a_run").mkdir()
    return [NO_CONFIG, "--resume", str(tmp / "not_a_run")]


def _resume_and_run_dir(tmp: Path, cfg: dict) -> list[str]:
    return ["--resume", str(tmp), "--run_dir", str(tmp / "elsewhere")]


CASES: list[tuple[str, Setup, str]] = [
    ("mismatched line counts", _mismatched_lines, r"train\.en has 20000 lines but .*short\.de has 2"),
    ("empty file", _empty_file, r"empty\.en: file is empty"),
    ("empty line", _empty_line, r"gap\.de:5: empty line"),
    ("invalid UTF-8", _invalid_utf8, r"latin1\.en:42: invalid UTF-8 \(byte 0xe9 at column 4\)"),
    ("NUL byte in a sentence", _nul_byte, r"corrupt\.de:10: NUL byte at column 3"),
    ("ami.init_forward that is not a checkpoint", _not_a_checkpoint,
     r"ami\.init_forward: .*/mle/checkpoints/forward is not a DeepSpeed checkpoint directory \(no 'latest'"),
    ("over-long sentence", _overlong_sentence,
     r"paragraph\.en:7: line of \d{5} characters is longer than data\.max_line_chars = 10000"),
    ("missing split", _missing_split, r"run\.yaml:\d+: data\.valid_src: required for data\.format 'parallel'"),
    ("config points to a missing file", _missing_data_file,
     r"run\.yaml:\d+: data\.train_src: file not found: .*missing\.en"),
    ("dialog that does not parse", _broken_dialog, r"d\.txt:3: expected 'partner message<TAB>response'"),
    ("dialog with broken turn numbering", _broken_turn_numbering,
     r"d\.txt:3: turn number 4 breaks the numbering \(expected 3"),
    ("dialog that is not UTF-8", _dialog_not_utf8, r"d\.txt:2: invalid UTF-8 \(byte 0xfc at column 4\)"),
    ("prepared directory with a truncated file", _truncated_prepared_dir,
     r"prepared: train\.tgt\.bin has 1000 bytes, the manifest says \d+ \(truncated or replaced\?\).*ami-prepare"),
    ("prepared directory of other settings", _mismatched_prepared_dir,
     r"data\.lowercase: .*prepared was prepared with False, this config says True"),
    ("unknown config key", _unknown_key, r"run\.yaml:\d+: train\.max_step: unknown key"),
    ("unknown config section", _unknown_section, r"run\.yaml:\d+: optimizer: unknown key \(known keys here: .*optim"),
    ("wrong type", _wrong_type, r"run\.yaml:\d+: train\.batch_size: expected an integer, got 'sixteen'"),
    ("out-of-range value", _out_of_range, r"run\.yaml:\d+: train\.label_smoothing: expected a value < 1, got 1\.5"),
    ("YAML syntax error", _yaml_syntax_error,
     r"run\.yaml:6: invalid YAML: .*\(while parsing a flow sequence that starts at line 4\)"),
    ("config that is not a mapping", _not_a_mapping, r"run\.yaml:1: expected a mapping of config keys .*a list"),
    ("duplicate config key", _duplicate_key, r"run\.yaml:\d+: train\.mle_steps: duplicate key \(also set at line"),
    ("DeepSpeed preset that does not exist", _missing_preset, r"configs/ds_zero9\.json: DeepSpeed preset not found"),
    ("DeepSpeed preset that is not JSON", _invalid_preset_json,
     r"preset\.json:4: invalid JSON: Expecting property name"),
    ("ZeRO stage that does not exist", _unknown_zero_stage,
     r"zero5\.json: zero_optimization\.stage: expected .*1, 2 or 3, got 5"),
    ("batch that does not divide", _indivisible_batch,
     r"train\.batch_size: 16 does not divide by world size 1 x train\.grad_accum 3"),
    ("out-of-range override", _bad_override, r"command line: model\.dropout: expected a value < 1"),
    ("override without '='", _override_without_value,
     r"command line: override 'train\.mle_steps' must look like key\.path=value"),
    ("override of an unknown key", _override_of_unknown_key, r"command line: train\.max_stepz: unknown key"),
    ("override replacing a section", _override_replacing_a_section,
     r"command line: model: expected a mapping, got 3"),
    ("unknown command-line option", _unknown_option, r"command line: unrecognized arguments: --learning-rate"),
    ("no --config", _no_config, r"command line: one of --config, --resume or --run_dir is required"),
    ("--resume of a directory that holds no run", _resume_of_a_non_run_dir,
     r"--resume .*not_a_run: not a run directory \(no config\.yaml in it\)"),
    ("--resume with --run_dir", _resume_and_run_dir, r"command line: --resume and --run_dir exclude each other"),
]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ami-dist: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("where", ["run.output_dir", "--run_dir"])
def test_an_output_directory_that_cannot_be_written_fails_before_anything_starts(where: str, tmp_path: Path) -> None:
    # A read-only filesystem for real: a tmpfs mounted read-only in a private mount namespace (unshare), where
    # even root cannot write; the run must say so before it prepares data, opens MLflow or meets other ranks.
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    cfg = tiny_config(tmp_path, run={"name": "test", "output_dir": str(readonly / "runs"), "seed": 7},
                      data={"cache_dir": str(tmp_path / "prepared")},
                      distributed={"deepspeed_config": str(ROOT / "configs/ds_zero2.json")})
    config = write_config(tmp_path, cfg)
    target = ["--run_dir", str(readonly / "run")] if where == "--run_dir" else []
    command = " ".join([PYTHON, str(ROOT / "ami_dist/train.py"), "--config", str(config), *target])
    mount = f"mount -t tmpfs -o size=1m,ro tmpfs {readonly}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && exec {command}"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    wanted = readonly / ("run" if where == "--run_dir" else "runs")
    assert f"ami-dist: error: {where}: cannot write under {wanted} ({readonly}: Read-only file system)" in line, line
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(name: str, setup: Setup, expected: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    extra = setup(tmp_path, cfg)
    config = tmp_path / "run.yaml"
    if not config.exists():  # a setup may write its own (broken) run.yaml
        write_config(tmp_path, cfg)
    argv = extra[1:] if extra[:1] == [NO_CONFIG] else ["--config", str(config), *extra]
    proc = subprocess.run([PYTHON, "ami_dist/train.py", *argv], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    assert re.search(expected, line), line
    # caught before training started: no run directory, no prepared corpus, no MLflow store
    _assert_nothing_written(tmp_path)


def _assert_nothing_written(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert not [p for p in runs.iterdir() if p.name != ".prepared"] if runs.exists() else True
    cache = runs / ".prepared"  # the prepare step's bookkeeping (lock, input digests) but no corpus
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name != "digests"] if cache.exists() else True
    assert not (tmp_path / "mlflow.db").exists()


def test_vocabulary_too_large_for_the_data_fails_cleanly(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, vocab={"size": 200000}, tracking={"enabled": True})
    proc = subprocess.run([PYTHON, "ami_dist/train.py", "--config", str(write_config(tmp_path, cfg))], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    assert "ami-dist: error: vocab.size: sentencepiece cannot train a 200000-piece model" in line
    _assert_nothing_written(tmp_path)  # the vocabulary is built when the corpus is prepared, before the run


# --- checkpoints and exported models ------------------------------------------------------------------
# One finished run (and its export) is built once, with every path relative to its directory; each case
# runs in its own copy of that directory (run, export and MLflow store) and must leave every file of the
# copy, and the run's MLflow history, as they were.







def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "mlflow.db"}  # the store: _mlflow_state


def _mlflow_state(case: Path) -> tuple[str, dict, dict, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{case / 'mlflow.db'}")
    run = client.get_run((case / "run" / "mlflow_run_id").read_text().strip())
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
               for key in run.data.metrics}
    return run.info.status, run.data.params, history, run.data.tags


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _untrusted(path: Path, marker: Path) -> None:
    torch.save({"module": Exploit(marker), "buffer_names": []}, path)  # a torch file whose pickle runs code


STEP4 = Path("run/checkpoints/forward/step4")
CheckpointSetup = Callable[[Path, Path], list[str]]


def _resume(case: Path) -> list[str]:
    return [str(ROOT / "ami_dist/train.py"), "--resume", "run"]


def _export(case: Path) -> list[str]:
    return ["-m", "ami_dist.export", "run", "--out", "exported.pt"]


def _evaluate(case: Path, model: Path) -> list[str]:
    return ["-m", "ami_dist.evaluate", "--model", str(model), "--src", str(DATA / "tatoeba_en_de/test.en"),
            "--out", "test.hyp", "--no_mlflow"]


def _resume_truncated_model_states(case: Path, marker: Path) -> list[str]:
    _cut(case / STEP4 / "mp_rank_00_model_states.pt")
    return _resume(case)


def _resume_truncated_rank_state(case: Path, marker: Path) -> list[str]:
    _cut(case / "run/checkpoints/ranks/step4/rank0.pt")
    return _resume(case)


def _resume_untrusted_pickle(case: Path, marker: Path) -> list[str]:
    _untrusted(case / STEP4 / "mp_rank_00_model_states.pt", marker)
    return _resume(case)


def _resume_latest_names_a_missing_tag(case: Path, marker: Path) -> list[str]:
    (case / "run/checkpoints/latest").write_text("step99")
    return _resume(case)


def _resume_with_another_model_shape(case: Path, marker: Path) -> list[str]:
    return [*_resume(case), "model.hidden_size=32"]


def _export_truncated_optimizer_states(case: Path, marker: Path) -> list[str]:
    _cut(case / STEP4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return _export(case)


def _export_untrusted_pickle(case: Path, marker: Path) -> list[str]:
    _untrusted(case / STEP4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    return _export(case)


def _export_another_model_shape(case: Path, marker: Path) -> list[str]:
    config = case / "run/config.yaml"  # the checkpoint of a 16-unit model under a 32-unit config
    config.write_text(config.read_text(encoding="utf-8").replace("hidden_size: 16", "hidden_size: 32"))
    return _export(case)


def _export_missing_tag(case: Path, marker: Path) -> list[str]:
    return [*_export(case), "--tag", "step3"]


def _export_average_more_than_kept(case: Path, marker: Path) -> list[str]:
    return [*_export(case), "--average", "3"]


def _export_average_best_never_kept(case: Path, marker: Path) -> list[str]:
    return [*_export(case), "--average", "best:2"]


def _export_average_and_tag(case: Path, marker: Path) -> list[str]:
    return [*_export(case), "--average", "2", "--tag", "step2"]


def _evaluate_truncated_model(case: Path, marker: Path) -> list[str]:
    _cut(case / "model.pt")
    return _evaluate(case, case / "model.pt")


def _evaluate_untrusted_pickle(case: Path, marker: Path) -> list[str]:
    _untrusted(case / "model.pt", marker)
    return _evaluate(case, case / "model.pt")


CHECKPOINT_CASES: list[tuple[str, CheckpointSetup, str]] = [
    ("resume: truncated model states", _resume_truncated_model_states,
     r"step4/mp_rank_00_model_states\.pt: truncated or corrupt"),
    ("resume: truncated rank state", _resume_truncated_rank_state, r"ranks/step4/rank0\.pt: truncated or corrupt"),
    ("resume: untrusted pickle", _resume_untrusted_pickle,
     r"step4/mp_rank_00_model_states\.pt: refused: unpickling it would call posix\.system"),
    ("resume: latest names a missing checkpoint", _resume_latest_names_a_missing_tag,
     r"run/checkpoints/latest: names checkpoint step99, which has no files"),
    ("resume: another model shape", _resume_with_another_model_shape,
     r"config\.yaml:\d+: model\.hidden_size: the checkpoints of run hold a model with "
     r"model\.hidden_size = 16, the config now asks for 32"),
    ("export: truncated optimizer states", _export_truncated_optimizer_states,
     r"step4/zero_pp_rank_0_mp_rank_00_optim_states\.pt: truncated or corrupt"),
    ("export: untrusted pickle", _export_untrusted_pickle,
     r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: refused: unpickling it would call posix\.system"),
    ("export: another model shape", _export_another_model_shape,
     r"checkpoints/forward/step4: encoder\.\S+ has shape \(\d+, 16\) but the model .*config\.yaml describes"),
    ("export: missing tag", _export_missing_tag, r"checkpoints/forward/step3: checkpoint not found"),
    ("export: average more than kept", _export_average_more_than_kept,
     r"--average 3: run has 2 complete checkpoints \(step4, step2\), fewer than 3"),
    ("export: average best never kept", _export_average_best_never_kept,
     r"--average best:2: \S*run/checkpoints/best\.json not found \(the run kept no best checkpoints: train it with "
     r"train\.keep_best=N"),
    ("export: average and tag", _export_average_and_tag, r"--tag and --average exclude each other"),
    ("evaluate: truncated model file", _evaluate_truncated_model,
     r"model\.pt: not a loadable ami-dist model file"),
    ("evaluate: untrusted pickle", _evaluate_untrusted_pickle,
     r"model\.pt: not a loadable ami-dist model file \(.*posix\.system"),
]


@pytest.mark.distributed  # trains a run first (like tests/test_export_evaluate_compare.py)
@pytest.mark.parametrize(("name", "setup", "expected"), CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_is_one_line_exit_2_and_damages_nothing(name: str, setup: CheckpointSetup, expected: str,
                                                               finished_run: Path, tmp_path: Path) -> None:
    case = tmp_path / "case"
    shutil.copytree(finished_run, case)
    uri = case / "run/mlflow_tracking_uri"  # the store's absolute URI, as a run made here would have it
    uri.write_text(f"sqlite:///{case / 'mlflow.db'}\n")
    marker = tmp_path / "pwned"
    argv = setup(case, marker)
    files, (status, params, history, _) = _snapshot(case), _mlflow_state(case)
    proc = run_in(case, argv)
    line = _one_error_line(proc)
    assert re.search(expected, line), line
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert _snapshot(case) == files, "a file that was already written changed (or a new one appeared)"
    after_status, after_params, after_history, tags = _mlflow_state(case)
    assert (after_params, after_history) == (params, history)  # the run's history is intact
    assert after_status == status, (after_status, tags)  # checked before the MLflow run was reopened
