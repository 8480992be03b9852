"""The files of a run directory (``runs/<name>-<time>/``), named in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """What a run directory holds: the resolved config, the MLflow run it logs to and that run's store, the
    vocabulary, each network's checkpoints, the validation outputs."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def mlflow_run_id(self) -> Path:
        return self.path / "mlflow_run_id"

    @property
    def mlflow_tracking_uri(self) -> Path:
        return self.path / "mlflow_tracking_uri"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def valid(self) -> Path:
        return self.path / "valid"

    def vocab(self, kind: str) -> Path:
        from ami_dist.data.vocab import VOCAB_FILES

        return self.path / VOCAB_FILES[kind]

    def holds_run(self) -> bool:
        return self.config.is_file()

    def run_id(self) -> str | None:
        """The MLflow run id this run logs to, where it has one."""
        return self.mlflow_run_id.read_text().strip() if self.mlflow_run_id.is_file() else None
