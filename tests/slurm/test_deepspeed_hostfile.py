"""The README's deepspeed-launcher command with a hostfile of the 4 emulated nodes, in its --no_ssh form
(the launcher started on every host, here by srun, where pdsh would start it over ssh): one run of 4
ranks, one per host."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PYTHON
from tests.slurm.conftest import RECIPE, Cluster

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NODES = ["node1", "node2", "node3", "node4"]


def test_deepspeed_hostfile_launch_over_four_hosts(cluster: Cluster, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))
    deepspeed = Path(PYTHON).parent / "deepspeed"
    launch = (f"{deepspeed} --hostfile {hostfile} --no_ssh --node_rank=$SLURM_NODEID --master_addr node1 "
              f"--master_port 29510 ami_dist/train.py --deepspeed_config configs/ds_zero2.json --config {RECIPE} "
              f"--run_dir {tmp_path / 'run'}")
    script = tmp_path / "per_host.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      "export CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu OMP_NUM_THREADS=1\n"
                      f"srun --output={tmp_path}/host%n.log bash -c '{launch}'\n")
    job = cluster.sbatch(str(script), tmp_path, ["--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=1"], {})
    fields = cluster.wait(job, timeout_s=420)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(tmp_path.glob("host*.log")))
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), logs

    client = MlflowClient(tracking_uri=job.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["launcher"] == "deepspeed/torchrun"  # ranks from the launcher, not from Slurm
    assert run.data.tags["hosts"] == ",".join(NODES)
    assert run.data.params["world_size"] == "4"
    shards = sorted((tmp_path / "run" / "checkpoints" / "forward" / "step10").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 4
