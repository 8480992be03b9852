"""Security: checkpoints and model files load with weights_only=True, so a hostile pickle cannot run code
through any loader of the project; no shell is ever started; the MLflow UI/server commands the project
documents bind to 127.0.0.1.

The static checks walk the AST (or the text of the docs) of the whole package; each is also run on a planted
violation, so a checker that has gone blind fails too.
"""

from __future__ import annotations

import ast
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ami_dist.errors import UserError
from tests.conftest import DATA, ROOT, tiny_config, write_config
from tests.finished_run import Exploit, run_in

PACKAGE = ROOT / "ami_dist"




def _hostile_torch_file(path: Path, marker: Path) -> None:
    torch.save({"module": Exploit(marker), "buffer_names": []}, path)


def _hostile_plain_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"module": Exploit(marker)}, protocol=2))


# --- every loader, in process (fast) ------------------------------------------------------------------

@pytest.mark.parametrize("write", [_hostile_torch_file, _hostile_plain_pickle])
def test_loaders_refuse_a_pickle_that_would_run_code(write: Callable[[Path, Path], None], tmp_path: Path) -> None:
    from deepspeed.utils import zero_to_fp32

    from ami_dist.distributed.safe_load import safe_torch_load, weights_only_loads
    from ami_dist.export import load_exported

    marker, hostile = tmp_path / "pwned", tmp_path / "hostile.pt"
    write(hostile, marker)
    with pytest.raises(UserError, match=r"hostile\.pt: "):
        safe_torch_load(hostile)
    with pytest.raises(UserError, match=r"hostile\.pt: not a loadable ami-dist model file"):
        load_exported(hostile)
    original = zero_to_fp32.torch
    with weights_only_loads(zero_to_fp32), pytest.raises(UserError, match=r"hostile\.pt: "):
        zero_to_fp32.torch.load(hostile, map_location="cpu", weights_only=False)  # DeepSpeed's own call
    assert zero_to_fp32.torch is original  # restored after the block
    assert not marker.exists(), "unpickling ran code"


# --- every loader, through the commands ---------------------------------------------------------------





STEP4 = "run/checkpoints/forward/step4"
MODEL_STATES = f"{STEP4}/mp_rank_00_model_states.pt"
OPTIM_STATES = f"{STEP4}/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RESUME = [str(ROOT / "ami_dist/train.py"), "--resume", "run"]
EXPORT = ["-m", "ami_dist.export", "run", "--out", "exported.pt"]
EVALUATE = ["-m", "ami_dist.evaluate", "--model", "hostile.pt", "--src", str(DATA / "tatoeba_en_de/test.en"),
            "--out", "test.hyp", "--no_mlflow"]


def _init_forward(case: Path) -> list[str]:
    """A new run whose forward network starts from the (hostile) checkpoint of another run."""
    cfg = tiny_config(case, train={"batch_size": 16, "mle_steps": 2}, model={"emb_dim": 16, "hidden_size": 16},
                      ami={"init_forward": str(case / "run/checkpoints/forward")})
    cfg["distributed"] = {"deepspeed_config": str(ROOT / "configs/ds_zero2.json")}
    return [str(ROOT / "ami_dist/train.py"), "--config", str(write_config(case, cfg, "new.yaml"))]


LOADERS: list[tuple[str, str, Callable[[Path, Path], None], Callable[[Path], list[str]]]] = [
    ("resume: DeepSpeed model states", MODEL_STATES, _hostile_torch_file, lambda case: RESUME),
    ("resume: DeepSpeed optimizer states", OPTIM_STATES, _hostile_torch_file, lambda case: RESUME),
    ("resume: per-rank state", "run/checkpoints/ranks/step4/rank0.pt", _hostile_torch_file, lambda case: RESUME),
    ("ami.init_forward", MODEL_STATES, _hostile_torch_file, _init_forward),
    ("export: model states", MODEL_STATES, _hostile_torch_file, lambda case: EXPORT),
    ("export: optimizer states", OPTIM_STATES, _hostile_torch_file, lambda case: EXPORT),
    ("evaluate: torch file", "hostile.pt", _hostile_torch_file, lambda case: EVALUATE),
    ("evaluate: plain pickle", "hostile.pt", _hostile_plain_pickle, lambda case: EVALUATE),
]


@pytest.mark.distributed  # trains a run first (like tests/test_export_evaluate_compare.py)
@pytest.mark.parametrize(("name", "target", "write", "command"), LOADERS, ids=[c[0] for c in LOADERS])
def test_hostile_pickle_runs_no_code_through_any_command(name: str, target: str, write: Callable,
                                                         command: Callable, finished_run: Path,
                                                         tmp_path: Path) -> None:
    case = tmp_path / "case"
    shutil.copytree(finished_run, case)
    marker = tmp_path / "pwned"
    write(case / target, marker)
    proc = run_in(case, command(case))
    assert not marker.exists(), f"{name}: unpickling {target} ran code"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("ami-dist: error:")]
    assert Path(target).name in line, line


# --- static checks over the package -------------------------------------------------------------------

SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
               "asyncio.create_subprocess_shell", "pty.spawn"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from the imports of a module (``from os import system as s``: s -> os.system)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # ``import a.b`` binds a; ``import a.b as c`` binds c to a.b
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return ""
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _with_parents(tree: ast.AST) -> Iterator[tuple[ast.AST, list[ast.AST]]]:
    stack: list[tuple[ast.AST, list[ast.AST]]] = [(tree, [])]
    while stack:
        node, parents = stack.pop()
        yield node, parents
        stack.extend((child, [*parents, node]) for child in ast.iter_child_nodes(node))


def scan(source: str, filename: str) -> tuple[int, list[str]]:
    """(number of torch.load calls, violations as ``file:line: what``): shell use, torch.load without
    weights_only=True, plain unpickling, and DeepSpeed's zero_to_fp32 loaders called outside
    ``with weights_only_loads(...)``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found, loads = [], 0
    for node, parents in _with_parents(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        where = f"{filename}:{node.lineno}"
        if name in SHELL_CALLS:
            found.append(f"{where}: {name} runs a shell")
        for k in node.keywords:
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                found.append(f"{where}: shell= other than False")
        loads += name in TORCH_LOADS
        if name in TORCH_LOADS and not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        ):
            found.append(f"{where}: {name} without weights_only=True")
        if name.startswith(("pickle.", "_pickle.", "marshal.", "shelve.", "dill.", "joblib.")):
            found.append(f"{where}: {name} (unpickling outside torch.load(weights_only=True))")
        if name.startswith("deepspeed.utils.zero_to_fp32.") and not any(
            isinstance(p, ast.With) and any(isinstance(item.context_expr, ast.Call)
                                            and _dotted(item.context_expr.func, aliases).endswith("weights_only_loads")
                                            for item in p.items)
            for p in parents
        ):
            found.append(f"{where}: {name} outside 'with weights_only_loads(...)' (it loads with weights_only=False)")
    return loads, found


def _package_sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the whole package, not an empty glob
    return files


def test_no_shell_and_every_load_is_weights_only() -> None:
    loads, found = 0, []
    for path in _package_sources():
        n, bad = scan(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        loads, found = loads + n, found + bad
    assert found == []
    assert loads >= 2  # the checkpoint loader and the model-file loader are there to be checked


PLANTED = {
    "import os\nos.system('ls ' + name)\n": "os.system runs a shell",
    "from os import popen as p\np(cmd)\n": "os.popen runs a shell",
    "import subprocess\nsubprocess.run(cmd, shell=True)\n": "shell= other than False",
    "import subprocess as sp\nsp.Popen(cmd, shell=flag)\n": "shell= other than False",
    "import torch\ntorch.load(path)\n": "torch.load without weights_only=True",
    "import torch\ntorch.load(path, weights_only=False)\n": "torch.load without weights_only=True",
    "from torch import load\nload(path, map_location='cpu')\n": "torch.load without weights_only=True",
    "import torch as t\nt.serialization.load(path, weights_only=None)\n": "torch.serialization.load without",
    "import pickle\npickle.loads(blob)\n": "pickle.loads (unpickling",
    "from deepspeed.utils import zero_to_fp32\nzero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(d)\n":
        "outside 'with weights_only_loads",
}


@pytest.mark.parametrize("source", PLANTED)
def test_the_static_check_sees_a_planted_violation(source: str) -> None:
    _, found = scan(source, "planted.py")
    assert len(found) == 1 and PLANTED[source] in found[0], found


def test_the_static_check_accepts_the_safe_forms() -> None:
    safe = ("import subprocess, torch\nsubprocess.run(['scontrol', 'show', x], shell=False)\n"
            "torch.load(p, map_location='cpu', weights_only=True)\n"
            "from deepspeed.utils import zero_to_fp32\nfrom ami_dist.distributed.safe_load import weights_only_loads\n"
            "with weights_only_loads(zero_to_fp32):\n    zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(d)\n")
    assert scan(safe, "safe.py") == (1, [])


# --- documented MLflow UI / server commands -----------------------------------------------------------

MLFLOW_COMMAND = re.compile(r"\bmlflow\s+(?:ui|server)\b")
LOCAL_HOST = re.compile(r"(?:--host|-h)[ =]127\.0\.0\.1\b")


def unbound_mlflow_commands(text: str, filename: str) -> tuple[int, list[str]]:
    """(number of ``mlflow ui``/``mlflow server`` commands, those without ``--host 127.0.0.1``)."""
    count, bad = 0, []
    lines, i = text.splitlines(), 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):  # a command continued over lines is one command
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        for match in MLFLOW_COMMAND.finditer(line):
            count += 1
            command = line[match.start():]
            if not LOCAL_HOST.search(command):
                bad.append(f"{filename}:{number}: {command[:100]}")
    return count, bad


def _documents() -> list[Path]:
    files = [*ROOT.glob("*.md"), ROOT / "Makefile", *(ROOT / "slurm").glob("*.sh"), *(ROOT / "slurm").glob("*.md"),
             *(ROOT / "benchmarks").rglob("*.py"), *_package_sources()]
    return [f for f in files if f.is_file()]


def test_documented_mlflow_commands_bind_to_localhost() -> None:
    total, bad = 0, []
    for path in _documents():
        count, unbound = unbound_mlflow_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        total, bad = total + count, bad + unbound
    assert bad == []
    assert total >= 3  # README's two and the one the trainer prints after a run


@pytest.mark.parametrize(("text", "unbound"), [
    ("mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000\n", 1),
    (".venv/bin/mlflow server --host 0.0.0.0 --port 5000\n", 1),
    ("mlflow ui --backend-store-uri x \\\n    --host 127.0.0.1\n", 0),
    ("f\"open the UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\"\n", 0),
])
def test_the_mlflow_command_check_sees_a_planted_violation(text: str, unbound: int) -> None:
    count, bad = unbound_mlflow_commands(text, "planted.md")
    assert count == 1 and len(bad) == unbound, bad
