"""The exported model as an MLflow model: logged by ami-export into the training run, loaded with
``mlflow.pyfunc.load_model``, registered, and served by the real ``mlflow models serve`` over HTTP — each
answering exactly what ``ami-generate`` writes for the same lines and options."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env

VENV_BIN = Path(PYTHON).parent
LINES = ["Tom is here.", "I like cats very much.", "", "Where is the station?"]
OPTIONS = [  # (ami-generate options, the same as request params)
    ([], {}),
    (["--beam", "4", "--n_best", "3"], {"beam": 4, "n_best": 3}),
    (["--sample", "--num_samples", "3", "--top_p", "0.9", "--seed", "5"],
     {"sample": True, "num_samples": 3, "top_p": 0.9, "seed": 5}),
    (["--beam", "4", "--rerank", "mmi"], {"beam": 4, "rerank": "mmi"}),
]


def _generated(case: Path, options: list[str]) -> list[tuple[int, float | None, str]]:
    """``ami-generate --scores`` on LINES, parsed."""
    proc = subprocess.run([PYTHON, "-m", "ami_dist.generate", "--model", "model.pt", "--scores", *options],
                          cwd=case, input="\n".join(LINES) + "\n", env={**subprocess_env(), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = []
    for line in proc.stdout.splitlines():
        number, score, text = line.split("\t")
        rows.append((int(number), float(score) if score else None, text))
    return rows


def _same(answer: list[dict], expected: list[tuple[int, float | None, str]]) -> None:
    assert [(row["line"], row["text"]) for row in answer] == [(n, t) for n, _, t in expected]
    for row, (_, score, _) in zip(answer, expected, strict=True):
        assert (row["score"] is None) == (score is None)
        if score is not None:
            assert abs(row["score"] - score) < 1e-4  # ami-generate prints 4 decimals


@pytest.fixture(scope="module")
def logged(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    case = tmp_path_factory.mktemp("mlflow_model") / "case"
    shutil.copytree(finished_run, case)
    uri = f"sqlite:///{case / 'mlflow.db'}"
    (case / "run/mlflow_tracking_uri").write_text(uri + "\n")
    proc = subprocess.run([PYTHON, "-m", "ami_dist.export", "run", "--out", "model.pt", "--register", "tiny-nmt"],
                          cwd=case, env={**subprocess_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = (case / "run/mlflow_run_id").read_text().strip()
    assert f"logged the MLflow model runs:/{run_id}/model; registered as tiny-nmt" in proc.stdout
    return {"case": case, "uri": uri, "model_uri": f"runs:/{run_id}/model", "run_id": run_id,
            "expected": [_generated(case, options) for options, _ in OPTIONS]}


def test_pyfunc_round_trip_generates_what_ami_generate_writes(logged: dict) -> None:
    mlflow.set_tracking_uri(logged["uri"])
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    for (_, params), expected in zip(OPTIONS, logged["expected"], strict=True):
        _same(model.predict(pd.DataFrame({"text": LINES}), params=params), expected)
    meta = model.metadata
    assert meta.metadata["licenses"] == {"ami-dist": "Apache-2.0", "data": "CC BY 2.0 FR"}
    assert [c["name"] for c in meta.signature.inputs.to_dict()] == ["text"]
    assert {p.name for p in meta.signature.params.params} >= {"beam", "n_best", "sample", "top_p", "rerank"}
    artifacts = mlflow.artifacts.download_artifacts(logged["model_uri"])
    assert {p.name for p in Path(artifacts, "artifacts").iterdir()} == {"model.pt", "config.yaml", "spm.model"}
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"--top_p must be in \(0, 1\], got 1.5"):
        model.predict(pd.DataFrame({"text": ["x"]}), params={"sample": True, "top_p": 1.5})
    registered = mlflow.pyfunc.load_model("models:/tiny-nmt/1")  # the model registry of the embedded store
    _same(registered.predict(pd.DataFrame({"text": LINES})), logged["expected"][0])
    run = mlflow.MlflowClient(logged["uri"]).get_run(logged["run_id"])
    assert run.info.status == "FINISHED"  # logging the model leaves the training run as it was


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers_generation_requests(logged: dict) -> None:
    port = _free_port()
    env = {**subprocess_env(), "MLFLOW_TRACKING_URI": logged["uri"], "PATH": f"{VENV_BIN}:{subprocess_env()['PATH']}"}
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", logged["model_uri"], "--host",
                               "127.0.0.1", "--port", str(port), "--env-manager", "local"], cwd=logged["case"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer /ping within 120 s"
            time.sleep(0.5)
        for (_, params), expected in zip(OPTIONS, logged["expected"], strict=True):
            status, answer = _post(port, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in LINES]},
                                          "params": params})
            assert status == 200, answer
            _same(answer["predictions"], expected)
        status, answer = _post(port, {"inputs": {"text": LINES[:1]}, "params": {"temperature": 0.0, "sample": True}})
        assert status == 400 and "--temperature must be > 0, got 0.0" in answer["message"], answer
    finally:
        server.terminate()
        server.wait(timeout=30)
