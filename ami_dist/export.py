"""Consolidate a run's checkpoint into one fp32 file for inference, and load such a file safely.

``python -m ami_dist.export RUN_DIR [--tag step900 | --average N|best:N|TAGS] [--out model.pt]`` gathers the
forward and backward networks from their DeepSpeed (ZeRO 1/2/3) shards into whole fp32 tensors (with
``--average``, the element-wise mean over several checkpoints, as NMT recipes report their final scores) and
writes them with the model config, the vocabulary and where they came from. The file holds only tensors,
numbers, strings and bytes, so ``torch.load(path, weights_only=True)`` reads it and a malicious file cannot
run code. The checkpoint shards are read with ``weights_only=True`` too, the consolidated weights are checked
against the run's model config before anything is written, and the output file is replaced atomically: a bad
checkpoint is one ``ami-dist: error:`` line (exit code 2) and leaves an earlier export untouched.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ami_dist.config import Config, load_config, to_dict
from ami_dist.data.vocab import Vocab, vocab_from_bytes
from ami_dist.disk import free_bytes, is_disk_full
from ami_dist.entry import Parser, command
from ami_dist.errors import UserError
from ami_dist.models import ModelConfig, Seq2Seq, build_model
from ami_dist.run_dir import RunDir
from ami_dist.typed_config import Located, build

FORMAT = "ami-dist-model/1"
NETWORKS = ("forward", "backward")


@dataclass
class Exported:
    """An exported pair of networks, ready to decode on the CPU."""

    networks: dict[str, Seq2Seq]
    vocab: Vocab
    source: dict[str, Any]  # run directory, tag, MLflow run and store, data and evaluation settings
    model_config: ModelConfig  # what both networks are

    def opposite(self, direction: str) -> Seq2Seq:
        """The network of the other direction than ``direction`` (what reranks its outputs)."""
        return self.networks["backward" if direction == "forward" else "forward"]


def average_tags(run_dir: Path, spec: str) -> list[str]:
    """The checkpoints ``--average SPEC`` names: ``N`` the newest N complete ones, ``best:N`` the N best by the
    run's ``eval.select`` (``checkpoints/best.json``, kept by ``train.keep_best``), or tags ``step8,step16``."""
    from ami_dist.training.checkpoint import completed_tags
    from ami_dist.training.selection import read_best

    files = RunDir(run_dir)
    spec = spec.strip()
    count_text = spec.removeprefix("best:")
    if count_text.isdigit():
        count = int(count_text)
        if count < 1:
            raise UserError(f"--average {spec}: expected at least 1 checkpoint")
        if spec.startswith("best:"):
            best = read_best(files.checkpoints)
            if best is None:
                raise UserError(f"--average {spec}: {files.checkpoints / 'best.json'} not found (the run kept no best "
                                "checkpoints: train it with train.keep_best=N and train.valid_every)")
            tags = [entry["tag"] for entry in best["best"]]
            what = f"best checkpoints by {best['metric']}"
        else:
            tags = completed_tags(run_dir)[::-1]
            what = "complete checkpoints"
        if len(tags) < count:
            raise UserError(f"--average {spec}: {run_dir} has {len(tags)} {what} ({', '.join(tags) or 'none'}), "
                            f"fewer than {count}")
        return sorted(tags[:count], key=lambda t: int(t.removeprefix("step")))
    tags = [t.strip() for t in spec.split(",") if t.strip()]
    if not tags or len(set(tags)) != len(tags):
        raise UserError(f"--average {spec}: expected N, best:N or distinct checkpoint tags such as step8,step16")
    return tags


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None,
               average: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the consolidated fp32 networks of checkpoint ``tag`` (default: the newest) to ``out``; with
    ``average`` (see ``average_tags``), the mean of the named checkpoints' weights instead. Returns the file and
    its ``source`` (where the weights came from: run, tags, MLflow run, data and evaluation settings)."""
    from ami_dist.tracking import absolute_uri, resolve_uri
    from ami_dist.training.checkpoint import latest_tag

    run_dir = Path(run_dir)
    if tag is not None and average is not None:
        raise UserError("--tag and --average exclude each other (--average step8,step16 names the tags)")
    files = RunDir(run_dir)
    if not files.holds_run():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml in it)")
    cfg: Config = load_config(files.config, check_files=False)  # only the run directory is needed
    tags = average_tags(run_dir, average) if average is not None else [tag or latest_tag(run_dir)]
    vocab_file = files.vocab(cfg.vocab.kind)
    if not vocab_file.is_file():
        raise UserError(f"{vocab_file}: vocabulary file missing from the run directory")
    vocab = vocab_from_bytes(cfg.vocab.kind, vocab_file.read_bytes())
    networks = {}
    expected = build_model(cfg.model, len(vocab), vocab.pad_id)
    for name in NETWORKS:
        checkpoint = files.checkpoints / name
        total: dict[str, torch.Tensor] = {}
        for one in tags:
            if not (checkpoint / one).is_dir():
                raise UserError(f"{checkpoint / one}: checkpoint not found")
            print(f"reading {name} {one}", file=sys.stderr, flush=True)
            state = consolidate(checkpoint, one)
            _check_fits(state, expected, checkpoint / one, files.config)
            for key, value in state.items():  # summed in float64: the mean of N fp32 tensors, rounded once
                total[key] = total[key] + value.double() if key in total else value.detach().double().clone()
        networks[name] = {key: (value / len(tags)).float().contiguous() for key, value in total.items()}
    uri_file = files.mlflow_tracking_uri
    source = {
        "run_dir": str(run_dir.resolve()),
        "tag": tags[-1],
        "averaged_tags": tags if len(tags) > 1 else [],
        "mlflow_run_id": files.run_id() or "",
        "tracking_uri": uri_file.read_text().strip() if uri_file.is_file() else absolute_uri(
            resolve_uri(cfg.tracking.uri)),
        "experiment": cfg.tracking.experiment,
        "task": cfg.run.task,
        "data": to_dict(cfg.data),
        "licenses": {"ami-dist": "Apache-2.0", "data": cfg.data.license},
        "eval": to_dict(cfg.eval),
    }
    return write_model_file(out, cfg.model, vocab, networks, source), source


def write_model_file(out: str | Path, model: ModelConfig, vocab: Vocab, networks: dict[str, dict[str, torch.Tensor]],
                     source: dict[str, Any]) -> Path:
    """The model file: both networks' fp32 weights with their config, vocabulary and ``source`` (where they came
    from, the data and evaluation settings). Replaced atomically: an earlier file stays whole until the new one is."""
    payload = {"format": FORMAT, "model": to_dict(model), "vocab": {"kind": vocab.kind, "data": vocab.to_bytes()},
               "networks": networks, "source": source}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if not is_disk_full(e, out.parent):
            raise
        free = free_bytes(out.parent)
        need = sum(t.numel() * t.element_size() for net in networks.values() for t in net.values())
        raise UserError(f"{out}: no space left on the device (the file needs about {need / 2**20:.1f} MiB; it ran out "
                        f"after {written / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free); "
                        f"{'the earlier file is untouched' if out.exists() else 'nothing was written'}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def consolidate(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 consolidation of one network's shards, every file read with ``weights_only=True``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the consolidation runs on the CPU; no guessing, no warning
    from deepspeed.utils import zero_to_fp32

    from ami_dist.distributed.safe_load import weights_only_loads

    try:  # DeepSpeed narrates every shard it reads on stdout and stderr; the failure, if any, is ours to say
        with weights_only_loads(zero_to_fp32), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    except UserError:
        raise
    except Exception as e:  # missing shards, a file of the wrong kind, shards that do not add up
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{checkpoint / tag}: not a consolidatable DeepSpeed ZeRO checkpoint "
                        f"({type(e).__name__}: {first})") from None


def _check_fits(state: dict[str, torch.Tensor], model: torch.nn.Module, checkpoint: Path, config: Path) -> None:
    """The weights must be exactly those of the network the run's config describes."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"{checkpoint}: no weights for {key}: the checkpoint is of another model than the one "
                            f"{config} describes (model.*, vocab.*)")
        if tuple(state[key].shape) != shape:
            raise UserError(f"{checkpoint}: {key} has shape {tuple(state[key].shape)} but the model {config} "
                            f"describes (model.*, vocab.*) needs {shape}: a checkpoint of another model shape")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{checkpoint}: unexpected weights {extra[0]} (and {len(extra) - 1} more): the checkpoint "
                        f"is of another model than the one {config} describes (model.*, vocab.*)")


def load_exported(path: str | Path) -> Exported:
    """Read an exported file with ``weights_only=True``; anything else than our format is a UserError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: model file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a model file") from None
    except Exception as e:  # a truncated file, a foreign pickle, code that would have to run to load it
        from ami_dist.distributed.safe_load import load_failure_reason

        raise UserError(f"{path}: not a loadable ami-dist model file ({load_failure_reason(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not an ami-dist model file (expected format {FORMAT!r}; export one with "
                        "python -m ami_dist.export RUN_DIR)")
    model_cfg = build(ModelConfig, payload["model"], Located(str(path)), prefix="model")
    vocab = vocab_from_bytes(payload["vocab"]["kind"], payload["vocab"]["data"])
    networks = {}
    for name in NETWORKS:
        model = build_model(model_cfg, len(vocab), vocab.pad_id)
        try:
            model.load_state_dict(payload["networks"][name], strict=True)
        except (KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise UserError(f"{path}: the {name} network's weights do not fit its config ({first})") from None
        networks[name] = model.eval()
    return Exported(networks, vocab, payload["source"], model_cfg)


@command
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m ami_dist.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run directory (runs/<name>-<time>)")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step900 (default: the newest)")
    parser.add_argument("--average", metavar="N|best:N|TAGS",
                        help="write the mean of several checkpoints' weights: the newest N, the N best by validation "
                        "(a run trained with train.keep_best), or the comma-separated tags, e.g. step800,step900")
    parser.add_argument("--out", help="output file (default: RUN_DIR/model.pt)")
    parser.add_argument("--register", metavar="NAME",
                        help="also register the MLflow model in the store's model registry under NAME")
    parser.add_argument("--no_mlflow", action="store_true",
                        help="write the file only (by default it is also logged as the MLflow model of the run's "
                        "MLflow run: runs:/<run id>/model, for mlflow.pyfunc and mlflow models serve)")
    args = parser.parse_args(argv)  # a mistake here is one line too (Parser raises UserError)
    if args.register and args.no_mlflow:
        parser.error("--register needs MLflow (drop --no_mlflow)")
    out, source = export_run(args.run_dir, args.out or Path(args.run_dir) / "model.pt", args.tag, args.average)
    averaged = source["averaged_tags"]
    what = f"fp32, the mean of {', '.join(averaged)}" if averaged else "fp32"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): forward and backward networks, {what}")
    if not args.no_mlflow:
        _log_to_mlflow(out, Path(args.run_dir), source, args.register)
    return 0


def _log_to_mlflow(out: Path, run_dir: Path, source: dict[str, Any], register: str | None) -> None:
    """The file as the MLflow model of the run; a run trained without tracking has none (unless one asked)."""
    from ami_dist.mlflow_model import log_model

    if not RunDir(run_dir).run_id():
        if register:
            raise UserError(f"--register {register}: {run_dir} trained with tracking off, so it has no MLflow run "
                            "to log the model to")
        return
    uri = log_model(out, run_dir, source, register)
    registered = f"; registered as {register}" if register else ""
    print(f"logged the MLflow model {uri}{registered} (serve it: mlflow models serve -m {uri} --env-manager local)")


if __name__ == "__main__":
    sys.exit(main())
