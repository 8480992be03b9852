"""What sharing one embedded MLflow store costs a sweep: four runs started together, each logging every step
and its system metrics, with a fifth process reading the store(s) the way the UI does.

On a machine with fewer cores than runs, no run can be as fast as alone, so "slowed against running alone"
measures the cores, not the store. This compares like with like instead: the same four runs, started together
on the same machine, once each with its own new store and once all on one new store (the reader lists runs
and reads metric histories of every store in both), alternating, ``--repeats`` times each. The ratio of the
slowest run's wall time, and of the runs' mean, is what the shared store adds.

    .venv/bin/python benchmarks/shared_store.py                # 4 runs x 40 steps, 2 repeats
    .venv/bin/python benchmarks/shared_store.py --steps 100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

READER = r"""
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
stop, uris, reads = Path(sys.argv[1]), sys.argv[2:], 0
while not stop.exists():
    for uri in uris:
        if not Path(uri[len("sqlite:///"):]).exists():
            continue
        client = MlflowClient(uri)
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                for key in list(run.data.metrics)[:5]:
                    client.get_metric_history(run.info.run_id, key)
                reads += 1
    time.sleep(0.05)
print(reads)
"""


def config(work: Path, i: int, uri: str, steps: int) -> Path:
    cfg = {
        "run": {"name": f"sweep{i}", "output_dir": str(work / "runs"), "seed": i},
        "data": {"format": "parallel", "license": "CC BY 2.0 FR",
                 "train_src": str(DATA / "tatoeba_en_de/train.en"), "train_tgt": str(DATA / "tatoeba_en_de/train.de"),
                 "valid_src": str(DATA / "tatoeba_en_de/valid.en"), "valid_tgt": str(DATA / "tatoeba_en_de/valid.de"),
                 "valid_limit": 64, "cache_dir": str(work / "cache")},
        "vocab": {"kind": "sentencepiece", "size": 1000},
        "model": {"emb_dim": 16, "hidden_size": 16, "enc_layers": 1, "dec_layers": 1, "input_feed": False},
        "train": {"batch_size": 16, "mle_steps": steps, "log_every": 1, "valid_every": steps // 2,
                  "threads_per_rank": 1},
        "eval": {"batch_size": 32, "max_len_b": 5},
        "tracking": {"uri": uri, "experiment": "sweep", "system_metrics_s": 0.5},
        "distributed": {"deepspeed_config": str(ROOT / "configs/ds_zero2.json")},
    }
    path = work / f"run{i}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def sweep(work: Path, shared: bool, steps: int, runs: int) -> list[float]:
    """Wall seconds of each run, started together (with the reader), on one store or on one store each."""
    uris = ([f"sqlite:///{work / 'shared' / 'mlflow.db'}"] * runs if shared else
            [f"sqlite:///{work / f'own{i}' / 'mlflow.db'}" for i in range(runs)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    stop = work / "stop"
    stop.unlink(missing_ok=True)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(stop), *sorted(set(uris))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "ami_dist/train.py"), "--config",
                               str(config(work, i, uri, steps)), "--run_dir", str(work / f"r{shared}{i}")],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, uri in enumerate(uris)]
    walls = [0.0] * runs
    pending = dict(enumerate(procs))
    while pending:
        for i, proc in list(pending.items()):
            if proc.poll() is not None:
                walls[i] = time.monotonic() - started
                out, err = proc.communicate()
                if proc.returncode:
                    sys.exit(out[-1500:] + err[-2000:])
                if "buffering" in err:
                    print(f"  note: run {i} buffered MLflow calls (the store was locked past 20 s)", flush=True)
                del pending[i]
        time.sleep(0.05)
    stop.touch()
    reader.communicate(timeout=120)
    for path in work.glob("r*"):  # the next sweep starts from new run directories and stores
        subprocess.run(["rm", "-rf", str(path)], check=True)
    for path in [work / "shared", *work.glob("own*")]:
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shared-store-") as tmp:
        work = Path(tmp)
        sweep(work, False, 2, 1)  # prepares the corpus once, outside the timing
        results: dict[bool, list[list[float]]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for shared in (False, True) if repeat % 2 == 0 else (True, False):
                walls = sweep(work, shared, args.steps, args.runs)
                results[shared].append(walls)
                print(f"repeat {repeat + 1}, {'one shared store' if shared else 'a store each'}: "
                      + ", ".join(f"{w:.1f}" for w in walls) + " s", flush=True)
    own = [max(w) for w in results[False]], [statistics.mean(w) for w in results[False]]
    one = [max(w) for w in results[True]], [statistics.mean(w) for w in results[True]]
    print(f"\n{args.runs} runs x {args.steps} steps, every step logged, system metrics every 0.5 s, a reader; "
          f"{os.cpu_count()} cores; medians of {args.repeats}")
    print(f"{'':18} {'slowest run s':>13} {'mean run s':>10}")
    print(f"{'a store each':18} {statistics.median(own[0]):13.1f} {statistics.median(own[1]):10.1f}")
    print(f"{'one shared store':18} {statistics.median(one[0]):13.1f} {statistics.median(one[1]):10.1f}")
    print(f"shared / own: slowest run {statistics.median(one[0]) / statistics.median(own[0]):.2f}x, "
          f"mean run {statistics.median(one[1]) / statistics.median(own[1]):.2f}x (the bound asked for: 1.20x)")


if __name__ == "__main__":
    main()
