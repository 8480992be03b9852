"""What the torchrun workers of the distributed tests share: build a Run the way the CLI does."""

from __future__ import annotations

from ami_dist.config import load_config
from ami_dist.data.prepare import ensure_prepared
from ami_dist.distributed import detect_launch, init_distributed
from ami_dist.tracking import Tracker
from ami_dist.training.build import build_run, make_run_dir, resolve_deepspeed
from ami_dist.training.context import Run


def build_test_run(config: str, preset: str, tracker: Tracker) -> Run:
    """Config and preset checked, data prepared, ranks joined (1 thread each), engines built."""
    cfg = load_config(config)
    ds_configs = resolve_deepspeed(cfg, preset, detect_launch().world_size)
    prepared = ensure_prepared(cfg, show=False)
    comm = init_distributed(cfg.distributed.timeout_s, 1, cfg.distributed.deepspeed_adapter)
    return build_run(cfg, comm, make_run_dir(cfg, comm), tracker, ds_configs, preset, prepared)
