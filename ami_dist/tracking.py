"""Experiment tracking behind one small interface: MLflow on rank 0, a no-op everywhere else.

The default store is the embedded ``sqlite:///mlflow.db`` in the working directory; ``MLFLOW_TRACKING_URI``
or ``tracking.uri`` in the run config choose another. Open the UI on the default store with
``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1``.

A remote tracking server (``http://`` or ``https://``) that goes down or becomes unreachable during a run
does not stop training. The first call that fails to connect switches the tracker to buffering: it prints
one ``ami-dist: warning:`` line and appends every later call (metrics with their step and timestamp,
params, tags, artifacts by path, the final status) as one JSON line to ``RUN_DIR/mlflow_buffer.jsonl``.
At most every ``AMI_DIST_MLFLOW_RETRY_S`` seconds (default 30) a call first checks whether the server
answers again; if so the buffer is replayed in order, with the original steps and timestamps, and then
deleted. At the end of the run a last few attempts are made; a buffer the server never took stays in the
run directory, to be replayed later with ``python -m ami_dist.tracking replay RUN_DIR``. Replaying is safe
to repeat: MLflow drops a metric whose key, step, timestamp and value it already holds.

A training run needs the server when it starts: MLflow assigns the run id, and the run directory records
it (``mlflow_run_id``) for resuming and for the other commands. An unreachable server at its start is a
user error (exit code 2) that names the URI. ``ami-evaluate`` and ``ami-compare`` (``start_offline``) start
buffering instead: their buffer's header says how to create the run, which the replay then does. For
remote URIs MLflow's HTTP client is given short timeouts and few retries (unless the
``MLFLOW_HTTP_REQUEST_*`` variables are set), so a dead server costs a few seconds, not MLflow's default of
minutes per call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from ami_dist.entry import command
from ami_dist.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
BUFFER_FILE = "mlflow_buffer.jsonl"
RETRY_ENV = "AMI_DIST_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 30.0
FINAL_ATTEMPTS = 3  # replays tried when the run ends with the server still away ...
FINAL_WAIT_S = 2.0  # ... this far apart (rank 0 may have only MARK_TIMEOUT_S to mark a failed run)
# MLflow's defaults (120 s timeout, 7 retries with backoff) make one call to a dead server take minutes.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_PROBE_TIMEOUT_S = 2.0
LOCKED = "database is locked"  # SQLite's word for a writer that waited its busy timeout out
_PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch call
_METRICS_PER_BATCH = 1000  # and on metrics
_PARAM_VALUE_MAX = 6000


class Tracker(Protocol):
    run_id: str | None
    experiment_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_inputs(self, datasets: list[dict[str, Any]]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything, records nothing (ranks other than 0, or tracking disabled)."""

    run_id: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go next to its file (MLflow's default is ./mlruns of the working dir)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    return (db.parent / "mlartifacts").as_uri()


# MLflow 3 records what an experiment is for in this tag (model training, not GenAI). Its 3.17 UI picks its views
# by a switch of its own instead (see ui_page), but the API, and UIs that read the tag, see it.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment if it does not exist (one made
    before without a kind gets it too)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=_artifact_location(uri), tags=EXPERIMENT_KIND)
    if not found.tags.get("mlflow.experimentKind"):
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def ui_page(experiment: str, run_id: str | None = None) -> str:
    """The UI's page of an experiment (or of one of its runs), in its model-training views: MLflow 3.17's UI
    chooses between those and its GenAI views by a switch of its own (default GenAI), which the URL sets."""
    page = f"#/experiments/{experiment}" + (f"/runs/{run_id}" if run_id else "/runs")
    return page + "?workflowType=machine_learning"


def resolve_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """A SQLite store's URI with its path made absolute (the run may be read from another directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


# -- an unreachable server ---------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def use_short_http_timeouts() -> None:
    """Short MLflow HTTP timeouts and retries for this process, unless the user set their own."""
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def is_unreachable(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) says the server could not be reached or did not answer,
    as opposed to a server that answered and rejected the call."""
    import requests

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.RetryError, ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if LOCKED in str(e):  # an embedded store another process held for longer than MLflow waits (20 s)
            return True
        e = e.__cause__ or e.__context__
    return False


def _reason(error: BaseException) -> str:
    """A few words on why the server was not reached (MLflow's own message is a paragraph)."""
    text = str(error)
    if LOCKED in text:
        return "the SQLite database stayed locked by another process for over MLflow's 20 s"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found.group(1).strip()
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "timed out"
    if "too many" in text and "error responses" in text:
        return "it answers with server errors"
    return type(error).__name__


def _say(message: str) -> None:
    """One line on stderr, written above a progress bar rather than after it."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def server_answers(uri: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """A cheap check (one TCP connection) that a remote server is back before anything is replayed."""
    if not is_remote(uri):
        return True
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            return True
    except OSError:
        return False


# -- the buffer --------------------------------------------------------------------------------------


def _send(client: Any, run_id: str, records: list[dict[str, Any]]) -> None:
    """Apply ``records`` (one call, or consecutive metrics records merged into one batch) to the run."""
    from mlflow.entities import Metric, Param, RunTag

    op = records[0]["op"]
    if op == "metrics":
        metrics = [Metric(k, float(v), r["timestamp"], r["step"]) for r in records for k, v in r["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
        return
    (record,) = records
    if op == "params":
        items = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i : i + _PARAMS_PER_BATCH])
    elif op == "tags":
        items = [RunTag(k, v) for k, v in record["tags"].items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=items[i : i + _PARAMS_PER_BATCH])
    elif op == "artifact":
        if not Path(record["path"]).exists():  # replayed later, after the file was removed
            _say(f"ami-dist: warning: artifact {record['path']} no longer exists; not logged")
            return
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif op == "inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], "local", json.dumps(d["source"]), None,
                                       json.dumps(d["profile"])), tags=[InputTag("mlflow.data.context", d["context"])])
                  for d in record["datasets"]]
        try:
            client.log_inputs(run_id, datasets=inputs)
        except MlflowException as e:
            # Runs of a sweep log the same dataset at once: MLflow looks for it, finds none, and inserts it, so all
            # but the first insert fail on the dataset's unique key. Now it exists, and a second call links it.
            if "UNIQUE" not in str(e) and "IntegrityError" not in str(e):
                raise
            client.log_inputs(run_id, datasets=inputs)
    elif op == "terminate":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown buffered operation {op!r}")


def _chunks(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records in order, consecutive metrics records merged up to MLflow's batch limit."""
    out: list[list[dict[str, Any]]] = []
    size = 0
    for record in records:
        n = len(record["metrics"]) if record["op"] == "metrics" else 0
        if out and record["op"] == "metrics" and out[-1][0]["op"] == "metrics" and size + n <= _METRICS_PER_BATCH:
            out[-1].append(record)
            size += n
        else:
            out.append([record])
            size = n
    return out


def read_buffer(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The buffer's header (tracking URI and run id) and its records; a last line cut short is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the process died while writing it
                break
            raise UserError(f"{path}:{number}: not a JSON record (the buffer is damaged)") from None
    if not records or records[0].get("op") != "run":
        raise UserError(f"{path}: not an ami-dist MLflow buffer (no header line)")
    return records[0], records[1:]


def _write_buffer(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in [header, *records]), encoding="utf-8")
    os.replace(tmp, path)


def replay_buffer(path: Path, client: Any = None, uri: str | None = None,
                  on_created: Callable[[str], None] | None = None) -> int:
    """Send the buffered records to their run, in order; returns how many. On success the buffer file is
    deleted; when a call fails it keeps the records not yet sent, and the error propagates. A buffer of a
    run that could not be created (its header's ``create``) creates it first, and records its id in the
    header before anything else is sent, so that a replay cut short never creates it twice."""
    header, records = read_buffer(path)
    if client is None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri or header["uri"])
    if header.get("run_id") is None:
        create = header["create"]
        header["run_id"] = client.create_run(experiment_id(client, create["experiment"], uri or header["uri"]),
                                             run_name=create["run_name"], tags=create["tags"]).info.run_id
        _write_buffer(path, header, records)
        if on_created is not None:
            on_created(header["run_id"])
    sent = 0
    try:
        for chunk in _chunks(records):
            _send(client, header["run_id"], chunk)
            sent += len(chunk)
    except BaseException:
        if sent:
            _write_buffer(path, header, records[sent:])
        raise
    path.unlink()
    return sent


# -- the tracker -------------------------------------------------------------------------------------


@contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """For an embedded ``sqlite:///`` store: one process at a time inside the block (a POSIX lock on
    ``<database>.lock``); for any other URI, nothing.

    MLflow creates (or upgrades) a store's tables when a process first opens it. Runs of a sweep started
    together on a store that did not exist yet each tried, and all but one died in MLflow's schema creation
    (``table latest_metrics already exists``); two runs may also both find no experiment of their name and
    both create it. Opening the store and getting or creating the experiment under this lock does each once.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


SCHEMA_ATTEMPTS = 10  # openings of a new store tried while another process may be creating its tables ...
SCHEMA_WAIT_S = 2.0  # ... this far apart


def _schema_race(error: BaseException) -> BaseException | None:
    """The error in ``error``'s chain that a second process creating or upgrading a store's tables at the same
    time causes (SQLAlchemy, alembic or sqlite3 errors, or MLflow finding the schema at another revision than
    its own); None if there is none."""
    seen: BaseException | None = error
    while seen is not None:
        module = type(seen).__module__
        if module.startswith(("sqlalchemy", "alembic", "sqlite3")) or "database schema" in str(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def open_client(uri: str, attempts: int = SCHEMA_ATTEMPTS, wait_s: float = SCHEMA_WAIT_S) -> Any:
    """An ``MlflowClient`` of ``uri``, with its store open (MLflow creates or upgrades a store's tables when a
    process first opens it).

    The lock of :func:`sqlite_store_lock` keeps ami-dist's own processes from creating one store together, but
    a process outside it (the MLflow UI started on a store that does not exist yet, a notebook) may be doing so
    at the same moment; the opening that meets its half-made tables fails inside MLflow's migrations. The other
    process finishes them, so the opening is tried again, ``attempts`` times ``wait_s`` apart, before the error
    is reported, naming the database.
    """
    from mlflow.tracking import MlflowClient

    attempt = 1
    while True:
        try:
            return MlflowClient(tracking_uri=uri)
        except Exception as e:
            race = _schema_race(e) if uri.startswith("sqlite:///") else None
            if race is None:
                raise
            if attempt >= attempts:
                last = (str(race).strip().splitlines() or [""])[-1][:600]
                raise UserError(f"{uri[len('sqlite:///'):]}: MLflow could not create or upgrade this store's "
                                f"tables ({type(race).__name__}: {last}); if another process (the MLflow UI, a "
                                "notebook) opened the new store at the same moment, start the run again; "
                                "otherwise the file may not be an MLflow store") from None
        _say(f"ami-dist: MLflow's tables in {uri} are being created by another process; trying again in "
             f"{wait_s:g} s")
        time.sleep(wait_s)
        attempt += 1


class MlflowTracker:
    """One MLflow run; metrics and params go in batches through MlflowClient (no global fluent state).

    With ``buffer_dir`` (the run directory), calls that cannot reach a remote server are buffered there
    and replayed later (see the module docstring); without it, every error propagates.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, buffer_dir: str | Path | None = None,
                 retry_every_s: float | None = None, buffer_name: str = BUFFER_FILE,
                 start_offline: bool = False) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations on a new store are noisy
        self.uri = uri
        self.buffer_dir = Path(buffer_dir) if buffer_dir is not None else None
        self.buffer = self.buffer_dir / buffer_name if self.buffer_dir is not None else None
        self._start_offline = start_offline and self.buffer is not None and run_id is None
        self.retry_every_s = (float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)) if retry_every_s is None
                              else retry_every_s)
        self.buffering = False
        self._last_try = 0.0
        self._last_error = ""
        self._lock = threading.RLock()  # the watchdog's thread may mark the run FAILED meanwhile
        if self.buffer is not None and is_remote(uri):
            use_short_http_timeouts()
        self._finished = False
        self.experiment_id: str | None = None
        self._system_metrics: Any = None
        self._earlier_params: dict[str, str] = {}  # of the run a resumed run continues
        with sqlite_store_lock(uri):
            self.client = open_client(uri)  # opens the store: creates its tables if it is new
            self._open(experiment, run_name, tags, run_id)

    def _open(self, experiment: str, run_name: str, tags: dict[str, str] | None, run_id: str | None) -> None:
        from mlflow.exceptions import MlflowException

        uri = self.uri
        try:
            if self.buffer is not None and self.buffer.is_file():  # left by an earlier attempt of this run
                try:  # first: it may end with that attempt's final status
                    count = replay_buffer(self.buffer, self.client)
                except MlflowException as e:
                    if is_unreachable(e):
                        raise
                    raise UserError(f"{self.buffer}: MLflow refused a record an earlier attempt of this run "
                                    f"buffered ({str(e)[:300]}); move the file away to start without it") from None
                _say(f"ami-dist: replayed {count} MLflow records buffered by an earlier attempt of this run")
            if run_id is not None:  # a resumed run continues its MLflow run
                try:
                    self._earlier_params = dict(self.client.get_run(run_id).data.params)
                except MlflowException as e:
                    if is_unreachable(e):
                        raise
                    raise UserError(f"MLflow run {run_id} not found in {uri} (cannot continue its history)"
                                    ) from None
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                self.experiment_id = self.client.get_run(run_id).info.experiment_id
                return
            self.experiment_id = experiment_id(self.client, experiment, uri)
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {}).info.run_id
        except MlflowException as e:
            if is_unreachable(e) and self._start_offline:  # the run is created when the buffer is replayed
                self.run_id = None
                create = {"experiment": experiment, "run_name": run_name, "tags": tags or {}}
                self._start_buffering(e, create)
                return
            if is_unreachable(e):
                raise UserError(f"MLflow tracking server {uri} unreachable ({_reason(e)}): the run needs it to "
                                "start; start it, or change tracking.uri, or set tracking.enabled=false") from None
            raise

    def log_params(self, params: dict[str, Any]) -> None:
        values = {k: str(v)[:_PARAM_VALUE_MAX] for k, v in params.items()}
        earlier = self._earlier_params
        # MLflow params cannot change; a value overridden on resume is recorded as a tag instead.
        changed = {f"resumed_with/{k}": f"{earlier[k]} -> {v}" for k, v in values.items()
                   if k in earlier and earlier[k] != v}
        values = {k: v for k, v in values.items() if k not in earlier}
        if values:
            self._do({"op": "params", "params": values})
        if changed:
            self.set_tags(changed)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._do({"op": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                  "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._do({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._do({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:
        """The run's datasets (MLflow's dataset inputs): each ``{"name", "digest", "source", "profile",
        "context"}``, context ``training`` or ``validation``."""
        self._do({"op": "inputs", "datasets": datasets})

    def start_system_metrics(self, every_s: float, resume: bool) -> None:
        """Log this machine's CPU, memory, disk, network (and GPU, where pynvml finds one) use every ``every_s``
        seconds as ``system/*`` metrics, until ``finish``: MLflow's own monitor, in a thread. It stops by itself
        (one warning) if the store cannot be reached; those samples are not buffered."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if self.run_id is None or self.buffering:
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop are not news
        self._system_metrics = SystemMetricsMonitor(self.run_id, sampling_interval=every_s, resume_logging=resume,
                                                    tracking_uri=self.uri)
        self._system_metrics.start()

    def finish(self, status: str = "FINISHED") -> None:
        if self._system_metrics is not None:  # its last samples go in before the run ends
            self._system_metrics.finish()
            self._system_metrics = None
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._do({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
            for attempt in range(FINAL_ATTEMPTS):
                if not self.buffering or self._try_replay():
                    return
                if attempt + 1 < FINAL_ATTEMPTS:
                    time.sleep(FINAL_WAIT_S)
            assert self.buffer is not None
            _, records = read_buffer(self.buffer)
            _say(f"ami-dist: warning: MLflow tracking server {self.uri} still unreachable at the end of the run"
                 f"{f' ({self._last_error})' if self._last_error else ''}; {len(records)} records stay in "
                 f"{self.buffer}; when the server is back, replay them with: python -m ami_dist.tracking replay "
                 f"{self._replay_target()}")

    # -- buffering ------------------------------------------------------------------------------------

    def _do(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self.buffering:
                self._append(record)
                if time.monotonic() - self._last_try >= self.retry_every_s:
                    self._try_replay()
                return
            try:
                _send(self.client, self.run_id, [record])
            except Exception as e:
                if self.buffer is None or not is_unreachable(e):
                    raise
                self._start_buffering(e)
                self._append(record)

    def _start_buffering(self, error: BaseException, create: dict[str, Any] | None = None) -> None:
        self.buffering = True
        self._last_try = time.monotonic()
        if not self.buffer.is_file():
            header = {"op": "run", "uri": self.uri, "run_id": self.run_id}
            if create is not None:
                header["create"] = create
            _write_buffer(self.buffer, header, [])
        what = "training continues, buffering metrics" if create is None else "buffering its records"
        _say(f"ami-dist: warning: MLflow tracking server {self.uri} unreachable ({_reason(error)}); {what} to "
             f"{self.buffer} and replaying them when the server returns (or later with: python -m "
             f"ami_dist.tracking replay {self._replay_target()})")

    def _replay_target(self) -> Path:
        """What to hand the replay command: the run directory, or a buffer file of another name."""
        assert self.buffer is not None and self.buffer_dir is not None
        return self.buffer_dir if self.buffer.name == BUFFER_FILE else self.buffer

    def _append(self, record: dict[str, Any]) -> None:
        with self.buffer.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _created(self, run_id: str) -> None:
        self.run_id = run_id

    def _try_replay(self) -> bool:
        """Replay the buffer if the server answers; True when it is empty again."""
        self._last_try = time.monotonic()
        if not server_answers(self.uri):
            self._last_error = "connection refused or timed out"
            return False
        try:
            count = replay_buffer(self.buffer, self.client, on_created=self._created)
        except Exception as e:
            error = _reason(e) if is_unreachable(e) else f"{type(e).__name__}: {str(e)[:300]}"
            if not is_unreachable(e) and error != self._last_error:  # rejected, not unreachable: say so once
                _say(f"ami-dist: warning: MLflow could not take the buffered records ({error}); they stay in "
                     f"{self.buffer}")
            self._last_error = error
            return False
        finally:
            self._last_try = time.monotonic()
        self.buffering = False
        self._last_error = ""
        _say(f"ami-dist: MLflow tracking server {self.uri} reachable again; replayed {count} buffered records")
        return True


def make_tracker(enabled: bool, is_main: bool, uri: str | None, experiment: str, run_name: str,
                 tags: dict[str, str] | None = None, run_id: str | None = None,
                 buffer_dir: str | Path | None = None, system_metrics_s: float = 0) -> Tracker:
    """An MLflow tracker on rank 0 when tracking is enabled (continuing ``run_id`` if given), else a no-op.
    With ``buffer_dir`` (the run directory) an unreachable server does not stop the run (module docstring);
    with ``system_metrics_s`` it also logs rank 0's machine use that often."""
    if not (enabled and is_main):
        return NullTracker()
    tracker = MlflowTracker(resolve_uri(uri), experiment, run_name, tags, run_id, buffer_dir=buffer_dir)
    if system_metrics_s:
        tracker.start_system_metrics(system_metrics_s, resume=run_id is not None)
    return tracker


# -- python -m ami_dist.tracking replay RUN_DIR ------------------------------------------------------


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ami_dist.tracking",
                                     description="MLflow tracking helpers of ami-dist.")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="send the MLflow records a run buffered while its tracking "
                                 "server was unreachable (RUN_DIR/mlflow_buffer.jsonl)")
    replay.add_argument("run_dir", type=Path, help="the run directory, or a buffer file (ami-evaluate's, "
                        "ami-compare's)")
    replay.add_argument("--uri", help="the tracking server, if it moved (default: the one the run used)")
    args = parser.parse_args(argv)
    path = args.run_dir if args.run_dir.is_file() else args.run_dir / BUFFER_FILE
    if not path.is_file():
        print(f"ami-dist: {path} does not exist: nothing to replay", flush=True)
        return 0
    uri = args.uri
    try:
        header, records = read_buffer(path)
        uri = uri or header["uri"]
        if is_remote(uri):
            use_short_http_timeouts()
            if not server_answers(uri):
                raise UserError(f"MLflow tracking server {uri} unreachable; {len(records)} records stay in {path}")
        created: list[str] = []
        count = replay_buffer(path, uri=uri, on_created=created.append)
    except UserError:
        raise
    except Exception as e:  # the server went away again, or rejected a record: what was not sent stays
        why = _reason(e) if is_unreachable(e) else f"{type(e).__name__}: {str(e)[:500]}"
        print(f"ami-dist: error: replay into {uri} stopped ({why}); the records not sent stay in {path}",
              file=sys.stderr, flush=True)
        return 1
    run_id = created[0] if created else header["run_id"]
    print(f"ami-dist: replayed {count} records into MLflow run {run_id}{' (created)' if created else ''} at {uri}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
