"""Two ranks map the same pages of a prepared corpus: what each holds privately does not grow with the
corpus (only its length arrays do, 8 bytes a pair), while the token ids they both read are shared."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from ami_dist.config import load_config
from ami_dist.data import prepare as prep
from tests.conftest import DATA, PYTHON, ROOT, subprocess_env, tiny_config, write_config

WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from ami_dist.procmem import smaps_rollup as smaps
    from ami_dist.data.batching import ShardedBucketSampler, make_batch
    from ami_dist.data.prepared import open_prepared

    root, rank, sync = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])


    def wait_for(name):
        (sync / f"{name}{rank}").touch()
        while not all((sync / f"{name}{r}").exists() for r in range(2)):
            time.sleep(0.05)

    before = smaps()
    data = open_prepared(root)
    train = data.train
    sampler = ShardedBucketSampler(train.src_ids.lengths(), train.tgt_ids.lengths(), 32, rank=rank, world=2)
    batches = sampler.epoch_batches(0)
    for indices in batches[:50]:
        make_batch([train.src_ids[i] for i in indices], [train.tgt_ids[i] for i in indices], 0, 2, 3)
    touched = int(train.src_ids.data.sum()) + int(train.tgt_ids.data.sum())  # every page of the ids, read
    wait_for("touched")
    after = smaps()
    print(json.dumps({"before": before, "after": after, "touched": touched}))
    wait_for("measured")
""")


def _corpus(tmp: Path, pairs: int) -> Path:
    """A WMT-shaped corpus of ``pairs`` pairs (the bundled sentences, three joined per line)."""
    sides = {}
    for side in ("en", "de"):
        lines = (DATA / f"tatoeba_en_de/train.{side}").read_text(encoding="utf-8").splitlines()
        joined = [" ".join(lines[(3 * i + j) % len(lines)] for j in range(3)) for i in range(pairs)]
        sides[side] = tmp / f"{pairs}.{side}"
        sides[side].write_text("\n".join(joined) + "\n", encoding="utf-8")
    cfg = tiny_config(tmp, data={"train_src": str(sides["en"]), "train_tgt": str(sides["de"])},
                      vocab={"size": 2000})
    return prep.prepare(load_config(write_config(tmp, cfg, f"{pairs}.yaml"), []), tmp / f"prepared{pairs}",
                        show=False)


def _two_ranks(root: Path, tmp: Path) -> list[dict]:
    sync = tmp / f"sync-{root.name}"
    sync.mkdir()
    procs = [subprocess.Popen([PYTHON, "-c", WORKER, str(root), str(rank), str(sync)], cwd=ROOT,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    return [json.loads(out) for out, _ in outs]


def test_ranks_share_the_ids_and_keep_private_memory_flat(tmp_path: Path) -> None:
    small, large = 20_000, 200_000
    reports = {n: _two_ranks(_corpus(tmp_path, n), tmp_path) for n in (small, large)}
    ids_bytes = sum(p.stat().st_size for p in (tmp_path / f"prepared{large}").glob("train.*.bin"))
    for rank in range(2):
        grown = {n: r[rank]["after"]["Private_Dirty"] - r[rank]["before"]["Private_Dirty"]
                 for n, r in reports.items()}
        per_pair = (grown[large] - grown[small]) / (large - small)
        # the in-memory path held ~2.7 KB a pair (text and Python lists); now the lengths are 8 bytes and
        # the sampler's epoch (permutation, steps) ~24 (measured: 32 in all); a private copy of one side's
        # ids would add ~65
        assert per_pair < 48, (grown, per_pair)
        shared = reports[large][rank]["after"]["Shared_Clean"] - reports[large][rank]["before"]["Shared_Clean"]
        assert shared > 0.9 * ids_bytes, (shared, ids_bytes)  # the other rank maps the very same pages
