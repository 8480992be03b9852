"""A Run with tiny real networks and no DeepSpeed, for the AMI objectives' unit tests.

The phase functions reach the networks through ``engine.module`` / ``engine(...)`` / ``engine.device``, so
a thin wrapper around an ``nn.Module`` stands in for a DeepSpeed engine here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from ami_dist.config import Config
from ami_dist.data.corpus import Split
from ami_dist.data.vocab import SPECIALS, WordVocab
from ami_dist.models import ModelConfig, build_model
from ami_dist.models.noise import NoiseNetwork
from ami_dist.training.context import Network
from ami_dist.training.synthetic import NoiseStream

WORDS = [f"w{i}" for i in range(26)]
HIDDEN = 16


class ModuleEngine:
    """What the phases use of a DeepSpeed engine: the module, its device, a forward call."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.device = torch.device("cpu")

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.module(*args, **kwargs)


def fake_run(k: int = 3, pairs: int = 6, dropout: float = 0.0, seed: int = 0, **ami: Any) -> SimpleNamespace:
    """Forward, backward and noise networks of width 16 over ``pairs`` random sentence pairs of 3-7 words."""
    cfg = Config()
    cfg.lns.k = k
    cfg.ami.enabled = True
    for key, value in ami.items():
        setattr(cfg.ami, key, value)
    vocab = WordVocab([*SPECIALS, *WORDS])
    gen = torch.Generator().manual_seed(seed)

    def sentence() -> list[int]:
        n = int(torch.randint(3, 8, (1,), generator=gen))
        return (torch.randint(len(SPECIALS), len(vocab), (n,), generator=gen)).tolist()

    src, tgt = [sentence() for _ in range(pairs)], [sentence() for _ in range(pairs)]
    split = Split([(vocab.decode(s), vocab.decode(t)) for s, t in zip(src, tgt, strict=True)], src, tgt)
    model_cfg = ModelConfig(emb_dim=HIDDEN, hidden_size=HIDDEN, enc_layers=1, dec_layers=1, dropout=dropout,
                            input_feed=True)
    torch.manual_seed(seed)
    networks = [Network("forward", "fw", ModuleEngine(build_model(model_cfg, len(vocab), vocab.pad_id)), split, split),
                Network("backward", "bw", ModuleEngine(build_model(model_cfg, len(vocab), vocab.pad_id)),
                        split.reversed(), split.reversed())]
    noise = NoiseNetwork(HIDDEN, HIDDEN)
    run = SimpleNamespace(cfg=cfg, vocab=vocab, networks=networks, noise=ModuleEngine(noise),
                          stream=NoiseStream(seed=99, offset=1000), stage=None)
    run.network = lambda name: next(n for n in networks if n.name == name)
    return run
