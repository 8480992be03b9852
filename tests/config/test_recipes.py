"""The paper's four recipes and their CPU-sized twins: they load, their networks have the sizes the
appendix implies, the twins train, and a broken recipe fails at load naming the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ami_dist.config import load_config
from ami_dist.errors import ConfigError
from ami_dist.models import build_model
from tests.conftest import PYTHON, ROOT, subprocess_env, write_config

RECIPES = ["dialog_lstm", "dialog_transformer", "nmt_lstm", "nmt_transformer"]


def _lstm_layer(inputs: int, hidden: int) -> int:
    return 4 * hidden * (inputs + hidden) + 8 * hidden  # four gates: input and recurrent weights, two biases


def _attention_block(d: int) -> int:
    return 4 * (d * d + d)  # query, key, value and output projections with biases


def _ffn(d: int, f: int) -> int:
    return d * f + f + f * d + d


def expected_parameters(recipe: str, vocab: int) -> int:
    """Parameter count of one network, written out from the appendix hyperparameters (Pan et al. 2020)."""
    if recipe == "dialog_lstm":  # 2 layers, hidden 500, embeddings 500, input feeding, general attention
        h = e = 500
        encoder = _lstm_layer(e, h) + _lstm_layer(h, h)
        decoder = _lstm_layer(e + h, h) + _lstm_layer(h, h)
        return 2 * vocab * e + encoder + decoder + h * h + 2 * h * h + h * vocab + vocab
    if recipe == "nmt_lstm":  # 4 layers of 1024, bidirectional encoder (2 x 512), embeddings 1024
        h = e = 1024
        encoder = 2 * (_lstm_layer(e, h // 2) + 3 * _lstm_layer(h, h // 2))
        decoder = _lstm_layer(e + h, h) + 3 * _lstm_layer(h, h)
        return 2 * vocab * e + encoder + decoder + h * h + 2 * h * h + h * vocab + vocab
    d, f = 512, 2048
    enc_layer = _attention_block(d) + _ffn(d, f) + 2 * 2 * d  # self-attention, FFN, two layer norms
    dec_layer = 2 * _attention_block(d) + _ffn(d, f) + 3 * 2 * d
    if recipe == "dialog_transformer":  # 2 + 2 layers (OpenNMT's default), separate embeddings
        return 2 * vocab * d + 2 * enc_layer + 2 * dec_layer + d * vocab + vocab
    # nmt_transformer: the base Transformer, 6 + 6 layers, one embedding shared by source, target, generator
    return vocab * d + 6 * enc_layer + 6 * dec_layer + vocab


@pytest.mark.parametrize("recipe", RECIPES)
def test_full_recipes_load_and_have_the_appendix_sizes(recipe: str) -> None:
    cfg = load_config(ROOT / f"configs/{recipe}.yaml")
    vocab = 32000
    with torch.device("meta"):  # counted without allocating the weights
        model = build_model(cfg.model, vocab, 0)
    count = sum(p.numel() for p in model.parameters())
    print(f"{recipe}: {count:,} parameters per network with a {vocab}-entry vocabulary")
    assert count == expected_parameters(recipe, vocab)
    assert cfg.ami.enabled and cfg.lns.k == 5
    # the release's values (onmt/opts.py, train.sh): the scale of δ and the strength weight, read separately
    assert (cfg.lns.scale, cfg.ami.strength_weight, cfg.ami.adv_max_grad_norm) == (1.0, 0.1, 0.1)
    assert cfg.ami.noise_pretrain_steps == 10000 and cfg.ami.demotion == "bounded"
    assert cfg.ami.strength_cap == pytest.approx((cfg.model.hidden_size / 64) ** 0.5, abs=0.05)


def test_recipes_carry_the_appendix_optimisation_settings() -> None:
    dialog = load_config(ROOT / "configs/dialog_lstm.yaml")
    assert (dialog.optim.name, dialog.optim.lr, dialog.optim.decay_start, dialog.optim.decay_every,
            dialog.optim.decay_factor, dialog.train.batch_size, dialog.model.dropout) == \
        ("sgd", 1.0, 15000, 5000, 0.95, 64, 0.3)
    nmt = load_config(ROOT / "configs/nmt_lstm.yaml")
    assert (nmt.optim.decay_start, nmt.optim.decay_every, nmt.optim.decay_factor, nmt.train.batch_size,
            nmt.model.dropout, nmt.vocab.kind) == (170000, 17000, 0.5, 128, 0.2, "sentencepiece")
    assert nmt.train.mle_steps == 340000
    for name in ("dialog_transformer", "nmt_transformer"):
        t = load_config(ROOT / f"configs/{name}.yaml")
        assert (t.optim.name, t.optim.adam_beta1, t.optim.adam_beta2, t.optim.adam_eps, t.optim.schedule) == \
            ("adam", 0.9, 0.998, 1e-9, "noam")
        assert (t.model.hidden_size, t.model.ffn_size, t.model.heads, t.model.dropout) == (512, 2048, 8, 0.1)


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", RECIPES)
def test_cpu_small_twin_trains(recipe: str, tmp_path: Path) -> None:
    twin = ROOT / f"configs/{recipe}_cpu_small.yaml"
    full, small = load_config(ROOT / f"configs/{recipe}.yaml"), load_config(twin)
    same = ("model.family", "model.norm", "model.input_feed", "model.bidirectional", "optim.name",
            "optim.schedule", "vocab.kind", "data.format", "ami.enabled", "lns.k", "lns.scale",
            "ami.strength_weight", "ami.demotion", "ami.adv_max_grad_norm", "ami.adv_lr")
    for key in same:
        section, name = key.split(".")
        assert getattr(getattr(small, section), name) == getattr(getattr(full, section), name), key
    proc = subprocess.run(
        [PYTHON, "ami_dist/train.py", "--config", str(twin), f"run.output_dir={tmp_path}", "tracking.enabled=false",
         "train.mle_steps=3", "train.log_every=1", "data.valid_limit=16", "ami.cycles=1", "ami.noise_pretrain_steps=1",
         "ami.noise_steps=1",
         "ami.forward_steps=2", "ami.backward_steps=2", "ami.adv_every=1"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished 9 steps" in proc.stdout


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"family": "transformer", "hidden_size": 500, "emb_dim": 500, "heads": 8},
         "model.heads: 8 heads do not divide"),
        ({"family": "transformer", "hidden_size": 512, "emb_dim": 256}, "model.emb_dim: must equal hidden_size"),
        ({"family": "rnn"}, "model.family: expected one of 'lstm', 'transformer'"),
        ({"norm": "sandwich"}, "model.norm: expected one of 'post', 'pre'"),
        ({"dropout": -0.1}, "model.dropout: expected a value >= 0"),
        ({"layers": 6}, "model.layers: unknown key"),
    ],
)
def test_bad_recipe_fails_at_load_naming_the_key(model: dict, expected: str, tmp_path: Path) -> None:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/nmt_transformer.yaml").read_text())
    cfg["model"].update(model)
    with pytest.raises(ConfigError, match=expected):
        load_config(write_config(tmp_path, cfg))
