"""What a training run holds: config, ranks, vocabulary, data, the networks' engines and the tracker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ami_dist.config.schema import Config
from ami_dist.data.batching import Batch, ShardedBucketSampler, make_batch
from ami_dist.data.corpus import Split
from ami_dist.data.vocab import Vocab
from ami_dist.distributed.comm import Comm
from ami_dist.tracking import Tracker
from ami_dist.training.guard import StepGuard
from ami_dist.training.schedule import Schedule, Stage
from ami_dist.training.selection import Selection
from ami_dist.training.synthetic import NoiseStream


@dataclass
class Network:
    """One seq2seq network and the direction it reads the data in."""

    name: str  # "forward" (S→T) or "backward" (T→S)
    short: str  # metric prefix: "fw" or "bw"
    engine: Any  # its DeepSpeed engine
    train: Split  # training data seen in this network's direction
    valid: Split

    def batch(self, indices: list[int], vocab: Vocab, split: Split | None = None) -> Batch:
        data = self.train if split is None else split
        return make_batch([data.src_ids[i] for i in indices], [data.tgt_ids[i] for i in indices],
                          vocab.pad_id, vocab.bos_id, vocab.eos_id).to(self.engine.device)


@dataclass
class Run:
    cfg: Config
    comm: Comm
    run_dir: Path
    vocab: Vocab
    networks: list[Network]
    sampler: ShardedBucketSampler
    tracker: Tracker
    schedule: Schedule
    guard: StepGuard  # skips non-finite updates and counts them
    noise: Any = None  # the noise network's DeepSpeed engine (AMI runs only)
    stream: NoiseStream | None = None  # this rank's latent-noise random stream
    step: int = 0  # batches consumed = global steps completed
    stage: Stage | None = None  # the stage whose optimizer settings are in force (set by the loop)
    critic: Any = None  # the fixed critic (a frozen backward network), once there is one
    bleu_signature: str = ""
    selection: Selection = field(init=False)  # the best checkpoints by eval.select and the early-stopping count

    def __post_init__(self) -> None:
        self.selection = Selection(self.cfg.eval.select, self.cfg.train.keep_best, self.cfg.train.early_stopping)

    def network(self, name: str) -> Network:
        return next(n for n in self.networks if n.name == name)
