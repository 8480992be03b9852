"""Everything that knows about ranks: launcher environment, collectives and DeepSpeed engines."""

from ami_dist.distributed.comm import Comm, init_distributed, shutdown
from ami_dist.distributed.engines import build_engine, full_parameters, load_preset, resolve_ds_config
from ami_dist.distributed.env import LaunchInfo, detect_launch

__all__ = ["Comm", "LaunchInfo", "build_engine", "detect_launch", "full_parameters", "init_distributed",
           "load_preset", "resolve_ds_config", "shutdown"]
