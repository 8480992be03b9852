"""The exported model as an MLflow model: a ``pyfunc`` that generates as ``ami-generate`` does.

``ami-export`` logs it into the training run (``runs:/<run id>/model``) with an input/output signature, the
model file, the run's config and vocabulary as artifacts, and the data's licences in its metadata; then

    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(pd.DataFrame({"text": ["Wie geht es dir?"]}),
                                                             params={"beam": 5, "n_best": 2})
    mlflow models serve -m runs:/<run id>/model --host 127.0.0.1 --port 5001 --env-manager local

answer with rows ``{"line", "score", "text"}`` (input lines numbered from 1; ``n_best`` rows per line), the
same outputs ``ami-generate --scores`` writes for the same lines and options. The params are ami-generate's
options by the same names (``sample: true`` for sampling); a bad one is an error naming it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from ami_dist.errors import UserError

# ami-generate's options a request may set, with their defaults there (n_best 0: ami-generate's own default)
PARAMS: dict[str, tuple[str, Any]] = {
    "direction": ("string", "forward"),
    "beam": ("long", 1),
    "n_best": ("long", 0),
    "length_penalty": ("double", 0.0),
    "sample": ("boolean", False),
    "num_samples": ("long", 1),
    "temperature": ("double", 1.0),
    "top_k": ("long", 0),
    "top_p": ("double", 1.0),
    "seed": ("long", 0),
    "rerank": ("string", "none"),
    "mmi_alpha": ("double", 0.5),
    "mmi_gamma": ("double", 0.0),
    "batch_size": ("long", 32),
}
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text")]),
    outputs=Schema([ColSpec("long", "line"), ColSpec("double", "score"), ColSpec("string", "text")]),
    params=ParamSchema([ParamSpec(name, dtype, default) for name, (dtype, default) in PARAMS.items()]),
)


def generate_argv(model_file: str, params: dict[str, Any] | None) -> list[str]:
    """The ami-generate command line that the request's params stand for."""
    argv = ["--model", model_file, "--scores"]
    for name, value in (params or {}).items():
        if name not in PARAMS:
            raise UserError(f"params: unknown parameter {name!r} (known: {', '.join(PARAMS)})")
        if value == PARAMS[name][1]:
            continue
        if name == "sample":
            argv += ["--sample"] if value else []
        else:
            argv += [f"--{name}", str(value)]
    return argv


class Generator(PythonModel):
    """Loads the model file once per server; each request decodes its lines as one ``ami-generate`` input."""

    def load_context(self, context: Any) -> None:
        from ami_dist.export import load_exported

        self.model_file = context.artifacts["model"]
        self.exported = load_exported(self.model_file)

    def predict(self, context, model_input: pd.DataFrame, params=None):  # MLflow reads these type hints
        """Rows ``{"line", "score", "text"}``: ``n_best`` per input line, lines numbered from 1."""
        from ami_dist.generate import decode_lines, parse_args, setup

        lines = list(model_input["text"]) if hasattr(model_input, "columns") else list(model_input)
        try:
            args = parse_args(generate_argv(self.model_file, params))
            job = setup(args, self.exported)
            found = decode_lines(job, [str(line) for line in lines], "request", 0)
        except UserError as e:
            message = str(e).removeprefix("command line: ")
            raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE) from None
        vocab = self.exported.vocab
        return [{"line": number, "score": None if hyp.score != hyp.score else hyp.score,
                 "text": vocab.decode(hyp.tokens)}
                for number, hyps in enumerate(found, start=1) for hyp in hyps[: args.n_best]]


def log_model(model_file: Path, run_dir: Path, source: dict[str, Any], register: str | None = None) -> str:
    """Log ``model_file`` (an export of ``run_dir``, written with ``source``) as an MLflow model of the run's MLflow
    run, named for the file (``model.pt``: ``runs:/<run id>/model``; ``model.avg3.pt``: ``.../model-avg3``; the
    newest of a name is the one the URI means), registered as ``register`` too if given. Returns its URI."""
    from ami_dist.config import load_config
    from ami_dist.run_dir import RunDir

    run_id, uri = source.get("mlflow_run_id"), source.get("tracking_uri")
    if not run_id or not uri:
        raise UserError(f"{run_dir}: the run has no MLflow run to log the model to (it trained with tracking off)")
    files = RunDir(run_dir)
    cfg = load_config(files.config, check_files=False)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines narrate the input example's check
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
    except MlflowException as e:
        raise UserError(f"{files.mlflow_run_id}: MLflow run {run_id} not found in {uri} ({e.message[:200]})") from None
    example = ["Hello!"] if source["data"]["format"] == "personachat" else ["How are you?"]
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(model_file).stem) or "model"
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=experiment_id,
                                            model_type="ami-dist seq2seq", tags={"tag": source["tag"]})
    staging = Path(tempfile.mkdtemp(prefix="ami-mlflow-model-"))
    try:
        mlflow.pyfunc.save_model(
            staging / name, python_model=str(Path(__file__).with_name("serving.py")), signature=SIGNATURE,
            artifacts={"model": str(model_file), "config": str(files.config),
                       "vocab": str(files.vocab(cfg.vocab.kind))},
            input_example=({"text": example}, {"beam": 1}),
            pip_requirements=_requirements(),
            metadata={"ami_dist_format": "ami-dist-model/1", "licenses": source["licenses"],
                      "checkpoint": source["tag"], "averaged_checkpoints": source.get("averaged_tags", []),
                      "task": source["task"],
                      "needs": "the ami-dist package (pip install -e . from its repository)"},
        )
        client.log_model_artifacts(logged.model_id, str(staging / name))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    client.finalize_logged_model(logged.model_id, "READY")
    from mlflow.entities import LoggedModelOutput

    step = int(source["tag"].removeprefix("step")) if source["tag"].startswith("step") else 0
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])  # the run page lists it
    if register:
        mlflow.register_model(f"models:/{logged.model_id}", register)
    return f"runs:/{run_id}/{name}"


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "sentencepiece", "mlflow", "pandas")]
