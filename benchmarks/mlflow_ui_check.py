"""Open the MLflow UI's pages in headless Chromium and check what they render for ami-dist's runs.

    apt-get install chromium                                   # Debian's; once
    .venv/bin/python benchmarks/mlflow_ui_check.py             # a fresh store: two short runs, a model, a comparison
    .venv/bin/python benchmarks/mlflow_ui_check.py --store mlflow.db --experiment ami-dist-demo   # an existing one

The client API says what the store holds (tests/test_mlflow_ux.py); this says what a person sees. Without
``--store`` it makes, in ``--out``, a store like a small sweep's: two short training runs nested under a
parent run, the first exported, logged and registered as an MLflow model, and an ``ami-compare`` of the two.
It then starts ``mlflow server --host 127.0.0.1``, renders each page with ``chromium --headless --dump-dom``
(after its scripts ran), checks the text each must show, writes a screenshot of each to ``--out``, prints
one line per page and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from html import unescape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def make_store(out: Path) -> tuple[Path, str, str]:
    """A store with a parent run, two nested training runs, a registered model and a comparison."""
    from ami_dist.tracking import MlflowTracker

    store = out / "mlflow.db"
    uri = f"sqlite:///{store}"
    parent = MlflowTracker(uri, "ui-check", "ui-sweep", {"kind": "experiment"})
    for name, seed in (("ui-a", 1), ("ui-b", 2)):
        _run([PYTHON, str(ROOT / "ami_dist/train.py"), "--config", str(ROOT / "configs/nmt_demo.yaml"), "--run_dir",
              str(out / name), f"run.name={name}", f"run.seed={seed}", "train.mle_steps=60", "train.save_every=0",
              "ami.noise_pretrain_steps=4", "ami.cycles=1", f"tracking.uri={uri}", "tracking.experiment=ui-check",
              f"tracking.parent_run_id={parent.run_id}", "tracking.system_metrics_s=1", "train.threads_per_rank=1",
              f"data.cache_dir={out / 'prepared'}"], ROOT)
    parent.finish()
    _run([PYTHON, "-m", "ami_dist.export", str(out / "ui-a"), "--register", "ui-check-model"], ROOT)
    _run([PYTHON, "-m", "ami_dist.compare", "--uri", uri, "--experiment", "ui-check", "--out", str(out / "compare")],
         ROOT)
    return store, "ui-check", "ui-check-model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(chromium: str, url: str, screenshot: Path) -> str:
    """The page's text after its scripts ran (and a screenshot of it)."""
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=20000", "--window-size=1500,1100"]
    subprocess.run([chromium, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", dom)))


GENAI_ONLY = ["Judges", "Prompts", "Sessions"]  # the GenAI views' sidebar, which a training run has no use for


def pages(client, experiment: str, model: str | None) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, URL fragment, texts it must show, texts it must not show) of each page checked, each opened in the
    model-training views (``ui_page``: the URL training prints)."""
    from ami_dist.compare import find_runs
    from ami_dist.errors import UserError
    from ami_dist.tracking import ui_page

    try:
        training = find_runs(client, [], experiment)  # what ami-compare would compare
    except UserError as e:
        raise SystemExit(str(e)) from None
    run = training[0]
    exp = client.get_experiment(run.info.experiment_id)
    runs = client.search_runs([exp.experiment_id])
    datasets = [f"{i.dataset.name} ({i.dataset.digest[:12]}" for i in run.inputs.dataset_inputs]
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    run_page = ui_page(exp.experiment_id, run.info.run_id)
    out = [
        ("experiment's runs", ui_page(exp.experiment_id), ["Model registry", *[r.info.run_name for r in top]],
         GENAI_ONLY),
        ("a training run", run_page, [run.info.run_name, *datasets[:1], "training", "system/cpu_utilization_percentage",
                                      "valid/fw_bleu", *([model] if model else [])], GENAI_ONLY),
        # the charts themselves draw only when scrolled into view; their groups are there at once
        ("its model metrics", run_page.replace("?", "/model-metrics?"), ["fw (", "bw (", "valid ("], GENAI_ONLY),
        ("its system metrics", run_page.replace("?", "/system-metrics?"), ["System metrics ("], GENAI_ONLY),
        ("its artifacts", run_page.replace("?", "/artifacts?"), ["config", "vocab", "valid"], GENAI_ONLY),
    ]
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id:
        children = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
        out.append(("the parent run", ui_page(exp.experiment_id, parent_id), ["Child runs", *children], GENAI_ONLY))
    if model:
        out.append(("the registered model", f"#/models/{model}?workflowType=machine_learning", [model, "Version 1"],
                    GENAI_ONLY))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="an existing SQLite store (default: make one in --out)")
    parser.add_argument("--experiment", default="ami-dist-demo", help="with --store: the experiment to look at")
    parser.add_argument("--model", help="with --store: a registered model to look at")
    parser.add_argument("--out", default="ui_check", help="screenshots (and the store it makes) go here")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium (Debian's package)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.store:
        store, experiment, model = Path(args.store).resolve(), args.experiment, args.model
    else:
        print(f"making a store in {out} (two short runs, a model, a comparison) ...", flush=True)
        store, experiment, model = make_store(out)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    kind = client.get_experiment_by_name(experiment).tags.get("mlflow.experimentKind")
    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    failed = 0
    try:
        base = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                with urllib.request.urlopen(base + "health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit("the MLflow server did not answer /health within 120 s")
        print(f"experiment kind: {kind} ({'ok' if kind == 'custom_model_development' else 'FAILED'})")
        failed += kind != "custom_model_development"
        for number, (name, fragment, must, must_not) in enumerate(pages(client, experiment, model), 1):
            shot = out / f"{number:02d}-{re.sub(r'[^a-z]+', '-', name.lower()).strip('-')}.png"
            text = render(chromium, base + fragment, shot)
            missing = [m for m in must if m not in text]
            present = [m for m in must_not if m in text]
            ok = not missing and not present
            failed += not ok
            detail = "" if ok else f" missing {missing}" + (f", showing {present}" if present else "")
            status = "ok    " if ok else "FAILED"
            print(f"{status} {name}: {base}{fragment} ({len(text)} characters; {shot.name}){detail}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{'all pages as expected' if not failed else f'{failed} check(s) failed'}; screenshots in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
