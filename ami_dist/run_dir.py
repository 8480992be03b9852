"""The files of a run directory (``runs/<name>-<time>/``), named in one place."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ami_dist.errors import UserError


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


def check_writable(target: Path, what: str) -> None:
    """``target`` (a directory, perhaps not made yet) can be written: a file is made and removed in it, or in the
    nearest ancestor that exists. A read-only filesystem, a directory without write permission or a full disk is a
    UserError naming ``what`` (the config key or option that chose it), before anything else is written."""
    existing = Path(os.path.abspath(target))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what}: {target}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ami-dist-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write under {target} ({existing}: {e.strerror}); choose a directory this "
                        "job can write, on storage every rank sees") from None
