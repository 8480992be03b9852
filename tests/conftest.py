"""Shared test helpers: paths into the repository and a small run config writer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
PYTHON = sys.executable


def tiny_config(tmp_path: Path, **sections: dict) -> dict:
    """A config dict for a seconds-long run on the bundled En–De sample, with ``sections`` merged in."""
    cfg = {
        "run": {"name": "test", "output_dir": str(tmp_path / "runs"), "seed": 7},
        "data": {
            "format": "parallel",
            "license": "CC BY 2.0 FR",
            "train_src": str(DATA / "tatoeba_en_de/train.en"),
            "train_tgt": str(DATA / "tatoeba_en_de/train.de"),
            "valid_src": str(DATA / "tatoeba_en_de/valid.en"),
            "valid_tgt": str(DATA / "tatoeba_en_de/valid.de"),
            "valid_limit": 64,
        },
        "vocab": {"kind": "sentencepiece", "size": 1000},
        "model": {"emb_dim": 32, "hidden_size": 32, "enc_layers": 1, "dec_layers": 1, "input_feed": False,
                  "dropout": 0.0},
        "train": {"batch_size": 16, "mle_steps": 10, "log_every": 5},
        "eval": {"batch_size": 32, "max_len_b": 5},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: quiet, one thread each, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    return env


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run and its export (tests/finished_run.py); copy it before changing anything."""
    from tests.finished_run import build_finished_run

    return build_finished_run(tmp_path_factory.mktemp("finished"))
