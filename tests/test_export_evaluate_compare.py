"""Export, evaluate and compare on real runs: the exported file loads with weights_only=True and
reproduces the run's validation perplexity, the reported BLEU is sacreBLEU's on the written files,
hostile or broken model files are refused, and two runs compare into a table and plots."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from sacrebleu.metrics import BLEU

from ami_dist.errors import UserError
from ami_dist.export import load_exported
from tests.conftest import DATA, PYTHON, ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed


def _run(args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("runs")
    made = []
    for name, dropout in (("first", 0.0), ("second", 0.2)):
        cfg = tiny_config(tmp, run={"name": name}, train={"batch_size": 16, "mle_steps": 8, "valid_every": 4},
                          model={"dropout": dropout}, optim={"name": "adam", "lr": 0.003},
                          tracking={"experiment": "compare-me"})
        _run(["ami_dist/train.py", "--config", str(write_config(tmp, cfg, f"{name}.yaml"))])
        made.append(next((tmp / "runs").glob(f"{name}-*")))
    return {"tmp": tmp, "dirs": made, "uri": cfg["tracking"]["uri"]}


def test_export_reproduces_the_run_and_evaluate_reports_sacrebleu(runs: dict) -> None:
    tmp, run_dir = runs["tmp"], runs["dirs"][0]
    _run(["-m", "ami_dist.export", str(run_dir), "--out", str(tmp / "model.pt")])
    exported = load_exported(tmp / "model.pt")  # weights_only=True inside
    assert set(exported.networks) == {"forward", "backward"}
    # the validation split the run evaluated on: its first 64 pairs (tiny_config's valid_limit)
    for side in ("en", "de"):
        lines = (DATA / f"tatoeba_en_de/valid.{side}").read_text(encoding="utf-8").splitlines()[:64]
        (tmp / f"valid.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = _run(["-m", "ami_dist.evaluate", "--model", str(tmp / "model.pt"), "--src", str(tmp / "valid.en"),
                 "--ref", str(tmp / "valid.de"), "--out", str(tmp / "valid.hyp")])
    result = json.loads((tmp / "valid.hyp.json").read_text())["metrics"]
    client = MlflowClient(tracking_uri=runs["uri"])
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    trained = client.get_run(run_id).data.metrics
    assert result["test/ppl"] == pytest.approx(trained["valid/fw_ppl"], rel=1e-4)  # same weights, same data
    hyps = (tmp / "valid.hyp").read_text(encoding="utf-8").splitlines()
    refs = (tmp / "valid.de").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 64
    assert result["test/bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=1e-9)
    assert f"bleu {result['test/bleu']:.2f}" in proc.stdout
    # the evaluation is an MLflow run nested under the training run
    (evaluation,) = client.search_runs([client.get_run(run_id).info.experiment_id],
                                       filter_string="tags.kind = 'evaluation'")
    assert evaluation.data.tags["mlflow.parentRunId"] == run_id
    assert evaluation.data.metrics["test/bleu"] == pytest.approx(result["test/bleu"])
    # log q(S|T̂) by the run's own backward network is the run's valid/mi_logq; a fixed critic scores it again:
    # the same network (as a model file) the same, another run's backward network (its checkpoints) otherwise
    assert result["test/mi_logq"] == pytest.approx(trained["valid/mi_logq"], rel=1e-4)
    for critic, name in ((tmp / "model.pt", "same"), (runs["dirs"][1] / "checkpoints/backward", "other")):
        _run(["-m", "ami_dist.evaluate", "--model", str(tmp / "model.pt"), "--src", str(tmp / "valid.en"),
              "--ref", str(tmp / "valid.de"), "--out", str(tmp / f"{name}.hyp"), "--fixed_critic", str(critic)])
        fixed = json.loads((tmp / f"{name}.hyp.json").read_text())["metrics"]["test/mi_logq_fixed"]
        assert (fixed == pytest.approx(result["test/mi_logq"], rel=1e-6)) == (name == "same"), (name, fixed)
    bad = _run(["-m", "ami_dist.evaluate", "--model", str(tmp / "model.pt"), "--src", str(tmp / "valid.en"),
                "--fixed_critic", str(tmp / "valid.en"), "--out", str(tmp / "bad.hyp"), "--no_mlflow"], expect=2)
    assert "valid.en: not a loadable ami-dist model file" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp / "bad.hyp").exists()  # refused before anything was written
    # beam search with MMI reranking runs through the same command
    _run(["-m", "ami_dist.evaluate", "--model", str(tmp / "model.pt"), "--src", str(tmp / "valid.en"),
          "--out", str(tmp / "mmi.hyp"), "--beam", "3", "--n_best", "3", "--rerank", "mmi", "--no_mlflow"])
    assert len((tmp / "mmi.hyp").read_text(encoding="utf-8").splitlines()) == 64


class _Exploit:
    def __reduce__(self):  # unpickling this would run a shell command
        return (__import__("os").system, (f"touch {self.marker}",))


def test_hostile_or_broken_model_files_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"format": "ami-dist-model/1", "x": _Exploit()}))
    with pytest.raises(UserError, match="not a loadable ami-dist model file"):
        load_exported(hostile)
    assert not marker.exists()  # weights_only=True: nothing ran
    proc = _run(["-m", "ami_dist.evaluate", "--model", str(hostile), "--src", str(DATA / "tatoeba_en_de/test.en")],
                expect=2)
    assert "ami-dist: error:" in proc.stderr and "Traceback" not in proc.stderr and not marker.exists()
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match="not an ami-dist model file"):
        load_exported(other)


def test_truncated_model_file_is_refused(runs: dict, tmp_path: Path) -> None:
    _run(["-m", "ami_dist.export", str(runs["dirs"][1]), "--out", str(tmp_path / "model.pt")])
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.pt: not a loadable ami-dist model file"):
        load_exported(tmp_path / "cut.pt")


def test_compare_writes_a_table_and_plots_of_two_runs(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    _run(["-m", "ami_dist.compare", "--experiment", "compare-me", "--uri", runs["uri"], "--out", str(out)])
    text = (out / "comparison.md").read_text()
    assert "first (" in text and "second (" in text
    assert "| valid/fw_bleu |" in text and "| valid/fw_ppl |" in text
    for png in ("valid_bleu.png", "losses.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / png).stat().st_size > 10_000
    client = MlflowClient(tracking_uri=runs["uri"])
    experiment = client.get_experiment_by_name("compare-me").experiment_id
    (comparison,) = client.search_runs([experiment], filter_string="tags.kind = 'comparison'")
    assert {a.path for a in client.list_artifacts(comparison.info.run_id, "comparison")} == {
        "comparison/comparison.md", "comparison/valid_bleu.png", "comparison/losses.png"}
    assert len(comparison.data.tags["compared_runs"].split(",")) == 2
    _run(["-m", "ami_dist.compare", "--runs", "0123456789abcdef", "--uri", runs["uri"]], expect=2)


def test_export_needs_only_the_run_directory(finished_run: Path, tmp_path: Path) -> None:
    """The corpus a run trained on may have moved since: ami-export reads only the run directory."""
    import shutil

    from tests.finished_run import run_in

    case = tmp_path / "case"
    shutil.copytree(finished_run, case)
    config = case / "run/config.yaml"
    moved = config.read_text().replace(str(DATA), str(tmp_path / "moved-away"))
    assert moved != config.read_text()
    config.write_text(moved)
    proc = run_in(case, ["-m", "ami_dist.export", "run", "--out", "again.pt"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    before, after = load_exported(case / "model.pt"), load_exported(case / "again.pt")
    assert after.source["licenses"] == {"ami-dist": "Apache-2.0", "data": "CC BY 2.0 FR"}  # the data's own
    for name, network in before.networks.items():
        again = after.networks[name].state_dict()
        assert all(torch.equal(value, again[key]) for key, value in network.state_dict().items()), name


def test_evaluate_with_the_tracking_server_down_buffers_and_the_replay_creates_its_run(finished_run: Path,
                                                                                      tmp_path: Path) -> None:
    """ami-evaluate does not need the server: its records wait beside its output, and the replay (once the
    server is back) creates the evaluation run, nested under the training run, with every record."""
    import shutil

    from ami_dist.distributed.env import _free_port
    from tests.finished_run import run_in

    case = tmp_path / "case"
    shutil.copytree(finished_run, case)
    payload = torch.load(case / "model.pt", weights_only=True)
    payload["source"]["tracking_uri"] = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    torch.save(payload, case / "offline.pt")
    src, ref = DATA / "tatoeba_en_de/valid.en", DATA / "tatoeba_en_de/valid.de"
    proc = run_in(case, ["-m", "ami_dist.evaluate", "--model", "offline.pt", "--src", str(src), "--ref", str(ref),
                         "--out", "eval/valid.hyp"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unreachable" in proc.stderr and (case / "eval/valid.hyp").is_file()
    buffer = case / "eval/valid.hyp.mlflow_buffer.jsonl"
    assert buffer.is_file(), proc.stderr[-2000:]
    metrics = json.loads((case / "eval/valid.hyp.json").read_text())["metrics"]

    back = f"sqlite:///{tmp_path / 'back.db'}"  # the server's store, answering again
    replay = run_in(case, ["-m", "ami_dist.tracking", "replay", str(buffer), "--uri", back])
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert "(created)" in replay.stdout and not buffer.exists()
    client = MlflowClient(tracking_uri=back)
    (run,) = client.search_runs([client.get_experiment_by_name(payload["source"]["experiment"]).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "evaluation"
    assert run.data.tags["mlflow.parentRunId"] == payload["source"]["mlflow_run_id"]
    assert run.data.metrics["test/bleu"] == pytest.approx(metrics["test/bleu"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {
        "evaluation/valid.hyp", "evaluation/valid.hyp.json"}
