"""Run configs: defaults, overrides, and errors that name the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ami_dist.config import load_config, save_config
from ami_dist.config.schema import Config
from ami_dist.errors import ConfigError
from tests.conftest import ROOT, tiny_config, write_config


def _error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_shipped_configs_load() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config)


def test_defaults_are_the_papers_dialog_lstm(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path, model={}, optim={})))
    optim = cfg.optim
    assert (optim.lr, optim.decay_start, optim.decay_every, optim.decay_factor) == (1.0, 15000, 5000, 0.95)
    assert cfg.train.batch_size == 16  # from the tiny config
    assert cfg.data.max_history_turns == 3


def test_overrides_are_typed_and_win(tiny: dict, tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, tiny), ["train.mle_steps=123", "model.dropout=0.25",
                                                     "model.bidirectional=true"])
    assert cfg.train.mle_steps == 123 and cfg.model.dropout == 0.25 and cfg.model.bidirectional is True


def test_unknown_key_names_file_line_and_key(tiny: dict, tmp_path: Path) -> None:
    tiny["model"]["hiden_size"] = 10
    path = write_config(tmp_path, tiny)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "hiden_size" in text)
    message = _error(path)
    assert f"{path}:{line}: model.hiden_size: unknown key" in message
    assert "hidden_size" in message  # the known keys are listed


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("model", "dropout", -0.1, "model.dropout: expected a value >= 0"),
        ("model", "hidden_size", "big", "model.hidden_size: expected an integer, got 'big'"),
        ("model", "attention", "mlp", "model.attention: expected one of 'general', 'dot'"),
        ("train", "mle_steps", 0, "train.mle_steps: must be > 0 for an MLE-only run"),
        ("train", "mle_steps", -1, "train.mle_steps: expected a value >= 0"),
        ("ami", "adv_every", 0, "ami.adv_every: expected a value >= 1"),
        ("ami", "init_forward", "/nonexistent", "ami.init_forward: checkpoint directory not found"),
        ("train", "batch_size", 1.5, "train.batch_size: expected an integer"),
        ("model", "bidirectional", "yes", "model.bidirectional: expected true or false"),
        ("model", "dec_layers", 3, "model.dec_layers: must equal enc_layers (1)"),
        ("data", "train_src", "/nonexistent/train.en", "data.train_src: file not found: /nonexistent/train.en"),
        ("vocab", "model", "/nonexistent/spm.model", "vocab.model: file not found"),
        ("train", "keep_best", 2, "train.keep_best: needs validations to rank by: set train.valid_every > 0"),
        ("train", "early_stopping", 3, "train.early_stopping: needs validations to rank by"),
        ("eval", "select", "mi_logq_fixed", "eval.select: mi_logq_fixed needs a fixed critic: ami.enabled"),
        ("eval", "select", "rouge", "eval.select: expected one of 'bleu', 'ppl', 'mi_logq_fixed'"),
    ],
)
def test_bad_values_name_the_key(tiny: dict, tmp_path: Path, section: str, key: str, value: object,
                                 expected: str) -> None:
    tiny.setdefault(section, {})[key] = value
    path = write_config(tmp_path, tiny)
    message = _error(path)
    assert expected in message
    assert message.startswith(f"{path}:")


def test_missing_required_file_key_for_format(tiny: dict, tmp_path: Path) -> None:
    del tiny["data"]["valid_tgt"]
    assert "data.valid_tgt: required for data.format 'parallel'" in _error(write_config(tmp_path, tiny))


def test_omitted_section_is_still_validated(tmp_path: Path) -> None:
    path = tmp_path / "no_data.yaml"
    path.write_text("run:\n  name: x\n", encoding="utf-8")
    assert f"{path}: data.train_src: required for data.format 'parallel'" in _error(path)


def test_bad_override_names_the_command_line(tiny: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path, tiny)
    assert "command line: train.max_stepz: unknown key" in _error(path, ["train.max_stepz=5"])
    assert "command line: model.dropout: expected a value >= 0" in _error(path, ["model.dropout=-1"])
    assert "must look like key.path=value" in _error(path, ["model.dropout"])


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n  seed: [1,\n", encoding="utf-8")
    assert _error(bad).startswith(f"{bad}:")
    assert "invalid YAML" in _error(bad)
    assert "config file not found" in _error(tmp_path / "nope.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n", encoding="utf-8")
    assert "expected a mapping" in _error(scalar)


def test_saved_config_round_trips(tiny: dict, tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, tiny), ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


AMI = {"enabled": True, "noise_pretrain_steps": 2, "cycles": 1, "noise_steps": 1, "forward_steps": 2,
       "backward_steps": 2, "adv_every": 1}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lns.k=1"], "lns.k: 1 with ami.baseline: the baseline is the mean over K samples"),
        (["lns.scale=0"], "lns.scale: 0 with ami.enabled: every one of the K perturbed copies would equal h"),
        (["ami.score_term=false", "ami.strength_term=false"], "ami.score_term: the noise phases need score_term or "
         "strength_term"),
        (["ami.score_term=false", "ami.strength_weight=0"], "ami.strength_weight: 0 with score_term off"),
        (["ami.adv_every=3"], "ami.adv_every: 3 is more than forward_steps (2) and backward_steps (2)"),
        (["eval.fixed_critic=/nonexistent"], "eval.fixed_critic: checkpoint directory not found"),
    ],
)
def test_ami_settings_that_would_silently_do_nothing_are_errors(tiny: dict, tmp_path: Path, overrides: list[str],
                                                                 expected: str) -> None:
    tiny["ami"] = dict(AMI)
    path = write_config(tmp_path, tiny)
    load_config(path)  # the base AMI config is fine
    assert expected in _error(path, overrides)


def test_silent_noop_checks_leave_working_settings_alone(tiny: dict, tmp_path: Path) -> None:
    tiny["ami"] = dict(AMI)
    path = write_config(tmp_path, tiny)
    # one sample is fine without the baseline; no noise phases need no noise terms; MLE-only runs need nothing
    load_config(path, ["lns.k=1", "ami.baseline=false"])
    load_config(path, ["ami.noise_steps=0", "ami.noise_pretrain_steps=0", "ami.score_term=false",
                       "ami.strength_term=false"])
    load_config(path, ["ami.enabled=false", "lns.scale=0", "lns.k=1"])


def test_renamed_key_says_what_it_became(tiny: dict, tmp_path: Path) -> None:
    tiny["lns"] = {"lam": 0.1}
    message = _error(write_config(tmp_path, tiny))
    assert "lns.lam: renamed to lns.scale" in message
