"""A remote MLflow tracking server that goes away during a run does not stop training: rank 0 buffers what
it would have logged in RUN_DIR/mlflow_buffer.jsonl and replays it, with the original steps and timestamps,
when the server is back, or later with ``python -m ami_dist.tracking replay RUN_DIR``.

The scenario test runs a real ``mlflow server`` on localhost and one 2-rank training run through two outages:
the first ends while the run trains (the buffer is replayed during training), the second lasts past the end
of the run (the buffer stays and the replay command sends it). The fast tests check the tracker alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ami_dist import tracking
from ami_dist.errors import UserError
from ami_dist.tracking import BUFFER_FILE, MlflowTracker
from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed

LAUNCHER = str(ROOT / ".venv/bin/deepspeed") if (ROOT / ".venv/bin/deepspeed").exists() else "deepspeed"
MLFLOW = str(ROOT / ".venv/bin/mlflow") if (ROOT / ".venv/bin/mlflow").exists() else "mlflow"
STEPS = 100
KEY = "fw/mle_nll"  # logged at every step (log_every 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, timeout: float, job: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the training run ended (code {job.returncode}) while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Server:
    """``mlflow server`` on 127.0.0.1:port over one SQLite file: started, stopped and started again."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port = tmp, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.tmp / f"server{self.starts}.log").open("w")
        env = subprocess_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner process
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}",
             "--default-artifact-root", str(self.tmp / "artifacts")],
            cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self.healthy, f"the MLflow server on port {self.port}", 180)

    def healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "the MLflow server exited"
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:  # workers of its group that outlived it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _history(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, KEY))


def _records(path: Path) -> list[dict]:
    return tracking.read_buffer(path)[1]  # (without a line the run is writing right now)


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole scenario, with what each step saw."""
    tmp = tmp_path_factory.mktemp("outage")
    server = Server(tmp, _free_port())
    run_dir = tmp / "run"
    buffer = run_dir / BUFFER_FILE
    cfg = tiny_config(
        tmp,
        train={"batch_size": 16, "mle_steps": STEPS, "log_every": 1},
        tracking={"enabled": True, "uri": server.uri, "experiment": "outage"},
        # the run is paused (SIGSTOP) while the server restarts: no rank may count that as a failure
        distributed={"failure_timeout_s": 600},
    )
    command = [LAUNCHER, "--num_gpus", "2", "--master_port", str(_free_port()), "ami_dist/train.py",
               "--deepspeed_config", "configs/ds_zero2.json", "--config", str(write_config(tmp, cfg)),
               "--run_dir", str(run_dir)]
    seen: dict = {"tmp": tmp, "run_dir": run_dir, "buffer": buffer, "server": server}
    job = None
    started = time.monotonic()
    try:
        server.start()
        seen["server_start_s"] = time.monotonic() - started
        with (tmp / "stdout").open("w") as out, (tmp / "stderr").open("w") as err:
            job = subprocess.Popen(command, cwd=ROOT, env=subprocess_env() | {tracking.RETRY_ENV: "1"},
                                   stdout=out, stderr=err, start_new_session=True)
        client = MlflowClient(tracking_uri=server.uri)
        _wait(lambda: (run_dir / "mlflow_run_id").is_file(), "the MLflow run", 300, job)
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        seen["run_id"] = run_id
        _wait(lambda: len(_history(client, run_id)) >= 3, "the first logged steps", 300, job)

        # Outage 1, while the run trains: it buffers, and replays once the server is back.
        server.stop()
        _wait(lambda: buffer.is_file() and len(_records(buffer)) >= 3, "buffered records", 120, job)
        os.killpg(job.pid, signal.SIGSTOP)  # the run waits for the server's restart, not the other way round
        try:
            seen["buffered_during_outage_1"] = len(_records(buffer))
            server.start()
        finally:
            os.killpg(job.pid, signal.SIGCONT)
        _wait(lambda: not buffer.exists(), "the replay while training", 120, job)
        seen["replayed_while_running"] = job.poll() is None

        # Outage 2, lasting past the end of the run.
        os.killpg(job.pid, signal.SIGSTOP)
        try:
            seen["steps_after_outage_1"] = _history(client, run_id)
            server.stop()
        finally:
            os.killpg(job.pid, signal.SIGCONT)
        seen["returncode"] = job.wait(timeout=600)
        seen["stdout"], seen["stderr"] = (tmp / "stdout").read_text(), (tmp / "stderr").read_text()
        seen["left_in_buffer"] = _records(buffer) if buffer.is_file() else []

        server.start()
        before = time.monotonic()
        replay = subprocess.run([PYTHON, "-m", "ami_dist.tracking", "replay", str(run_dir)], cwd=ROOT,
                                env=subprocess_env(), capture_output=True, text=True, timeout=300)
        seen["replay_s"] = time.monotonic() - before
        seen["replay"] = replay
        seen["steps_at_end"] = _history(client, run_id)
        seen["run"] = client.get_run(run_id)
        seen["total_s"] = time.monotonic() - started
    finally:
        if job is not None and job.poll() is None:
            os.killpg(job.pid, signal.SIGCONT)
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        server.stop()
    return seen


def test_training_continues_through_an_outage_and_replays_when_the_server_returns(outage: dict) -> None:
    assert outage["returncode"] == 0, outage["stderr"][-4000:]
    stderr = outage["stderr"]
    warnings = [line for line in stderr.splitlines() if "ami-dist: warning: MLflow tracking server" in line
                and "unreachable (" in line]
    assert len(warnings) == 2, stderr[-4000:]  # one per outage, not one per buffered call
    assert f"buffering metrics to {outage['buffer']}" in warnings[0]
    assert "reachable again; replayed" in stderr
    assert outage["buffered_during_outage_1"] >= 3
    assert outage["replayed_while_running"], "the buffer was replayed only at the end"
    steps = outage["steps_after_outage_1"]  # before the second outage: every step so far, once each
    assert len(steps) > outage["buffered_during_outage_1"]
    assert steps == list(range(1, len(steps) + 1))


def test_a_buffer_left_at_the_end_is_replayed_by_the_command(outage: dict) -> None:
    assert outage["returncode"] == 0
    assert f"replay them with: python -m ami_dist.tracking replay {outage['run_dir']}" in outage["stderr"]
    left = outage["left_in_buffer"]
    assert left[-1]["op"] == "terminate" and left[-1]["status"] == "FINISHED"
    assert any(r["op"] == "metrics" and KEY in r["metrics"] for r in left)
    replay = outage["replay"]
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert f"replayed {len(left)} records" in replay.stdout
    assert not outage["buffer"].exists()
    assert outage["steps_at_end"] == list(range(1, STEPS + 1))  # every step exactly once, no gaps
    run = outage["run"]
    assert run.info.status == "FINISHED"
    assert run.info.end_time == left[-1]["end_time"]  # the time the run ended, not the time of the replay
    assert run.data.tags["hosts"]
    print(f"scenario {outage['total_s']:.0f} s (first server start {outage['server_start_s']:.0f} s, "
          f"replay command {outage['replay_s']:.1f} s)")


# -- the tracker alone, fast --------------------------------------------------------------------------------


def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there


@pytest.fixture
def no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setattr(tracking, "FINAL_WAIT_S", 0.01)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the fast tests (creating one takes seconds); each test has its own run."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _tracker(store: str, tmp_path: Path, **kwargs) -> MlflowTracker:
    return MlflowTracker(store, "unit", "unit", buffer_dir=tmp_path, **kwargs)


def test_an_unreachable_server_at_the_start_is_a_user_error(tmp_path: Path, no_retries: None) -> None:
    uri = _closed_port_uri()
    before = time.monotonic()
    with pytest.raises(UserError, match=f"MLflow tracking server {uri} unreachable"):
        MlflowTracker(uri, "unit", "unit", buffer_dir=tmp_path)
    assert time.monotonic() - before < 10


def test_buffered_calls_replay_in_order_with_their_steps_and_timestamps(
        store: str, tmp_path: Path, no_retries: None, capsys: pytest.CaptureFixture) -> None:
    tracker = _tracker(store, tmp_path, retry_every_s=0.0)
    client = tracker.client
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.client = MlflowClient(tracking_uri=_closed_port_uri())  # the server goes away
    for step in (2, 3, 4):
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.set_tags({"note": "buffered"})
    buffer = tmp_path / BUFFER_FILE
    buffered = _records(buffer)
    assert [r.get("step") for r in buffered] == [2, 3, 4, None]
    assert capsys.readouterr().err.count("unreachable") == 1
    tracker.client = client  # and comes back
    tracker.log_metrics({"loss": 5.0}, 5)
    assert not buffer.exists() and not tracker.buffering
    assert "reachable again; replayed 5 buffered records" in capsys.readouterr().err
    tracker.finish()
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(1, 6)]
    assert [m.timestamp for m in history[1:4]] == [r["timestamp"] for r in buffered[:3]]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["note"] == "buffered"


def test_a_store_locked_past_mlflows_wait_buffers_and_replays(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Another process holds the embedded store's write lock for longer than MLflow's busy timeout (20 s):
    # the call that waited it out is buffered, not lost, and replayed once the lock is gone.
    import sqlite3

    database = tmp_path / "mlflow.db"
    tracker = MlflowTracker(f"sqlite:///{database}", "unit", "unit", buffer_dir=tmp_path, retry_every_s=0.0)
    tracker.log_metrics({"loss": 1.0}, 1)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        tracker.log_metrics({"loss": 2.0}, 2)  # waits out the 20 s, then goes to the buffer
        assert tracker.buffering
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "database stayed locked by another process" in capsys.readouterr().err
    tracker.log_metrics({"loss": 3.0}, 3)  # the lock is gone: the buffer replays first
    assert not tracker.buffering and not (tmp_path / BUFFER_FILE).exists()
    tracker.finish()
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_a_buffer_left_at_the_end_replays_with_the_command(
        store: str, tmp_path: Path, no_retries: None, capsys: pytest.CaptureFixture) -> None:
    tracker = _tracker(store, tmp_path, retry_every_s=3600.0)
    client = tracker.client
    tracker.client = MlflowClient(tracking_uri=_closed_port_uri())
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.finish("FINISHED")
    err = capsys.readouterr().err
    assert f"replay them with: python -m ami_dist.tracking replay {tmp_path}" in err
    assert [r["op"] for r in _records(tmp_path / BUFFER_FILE)] == ["metrics", "terminate"]
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    with (tmp_path / BUFFER_FILE).open("a") as f:
        f.write('{"op": "metr')  # a line cut short when the process died
    assert tracking.main(["replay", str(tmp_path)]) == 0
    assert "replayed 2 records" in capsys.readouterr().out
    assert not (tmp_path / BUFFER_FILE).exists()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1]


def test_a_rejected_call_is_an_error_not_an_outage(store: str, tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    tracker = _tracker(store, tmp_path)
    tracker.log_params({"lr": 0.1})
    with pytest.raises(MlflowException):
        tracker.log_params({"lr": 0.2})  # MLflow refuses to change a logged param
    assert not (tmp_path / BUFFER_FILE).exists() and not tracker.buffering


def test_a_resumed_run_replays_what_its_last_attempt_buffered_first(
        store: str, tmp_path: Path, no_retries: None, capsys: pytest.CaptureFixture) -> None:
    first = _tracker(store, tmp_path)
    client = first.client
    first.client = MlflowClient(tracking_uri=_closed_port_uri())
    first.log_metrics({"loss": 1.0}, 1)
    first.finish("SCHEDULED")  # preempted while the server was away
    second = _tracker(store, tmp_path, run_id=first.run_id)
    assert "replayed 2 MLflow records buffered by an earlier attempt" in capsys.readouterr().err
    assert not (tmp_path / BUFFER_FILE).exists()
    assert client.get_run(first.run_id).info.status == "RUNNING"  # not the SCHEDULED it replayed before
    assert [m.step for m in client.get_metric_history(second.run_id, "loss")] == [1]
