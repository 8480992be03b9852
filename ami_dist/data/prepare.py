"""Prepare a corpus once: check it, build the vocabulary, encode it with every core, write it memory-mappable.

What a run used to redo on every rank at every start (read both files into strings, train the vocabulary,
encode every sentence into Python lists) happens here once per corpus and settings:

1. **Check and sample** (streaming, constant memory): every line is checked as the trainer always checked
   it (UTF-8, empty lines, ``data.max_line_chars``, aligned line counts: a DataError naming file and line).
   Sentencepiece gets a sample of at most ``vocab.sample_size`` sentences, half from each side, drawn with
   ``vocab.sample_seed`` (all of them when the corpus is smaller, in file order, so a small corpus gets the
   very model the trainer trained before this step existed); a word vocabulary counts every token.
2. **Vocabulary**: trained on that sample with sentencepiece's own seed set, or read from ``vocab.model``
   (a resumed run passes its own, so it is never retrained).
3. **Encode** in ``data.prepare_workers`` processes (every core by default), chunk by chunk, written in
   corpus order; training pairs over ``data.max_src_len`` / ``data.max_tgt_len`` tokens are dropped and
   counted by reason.
4. **Write** into a temporary directory renamed into place (atomic: a prepared directory is complete or
   absent), with a manifest (:mod:`ami_dist.data.prepared`).

Prepared data is found again by its key, a hash of the inputs' sha256 and of every setting that shapes the
ids, under ``data.cache_dir``: the same inputs and settings are never prepared twice. Concurrent preparers
of one key (the ranks of a machine, the nodes of a job on a shared filesystem) serialise on a lock file; the
first prepares, the others find its result. Recomputing an input's sha256 is skipped while its size and
modification time are those recorded beside the cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ami_dist import __version__
from ami_dist.config.schema import Config
from ami_dist.data.corpus import read_split
from ami_dist.data.dialog import tokenize
from ami_dist.data.prepared import (
    MANIFEST,
    PREPARED_FORMAT,
    SIDES,
    bin_name,
    offsets_name,
    read_manifest,
    sha256_file,
)
from ami_dist.data.textio import count_lines, iter_lines, open_text_file
from ami_dist.data.vocab import VOCAB_FILES, SentencePieceVocab, Vocab, WordVocab, vocab_from_bytes, vocab_sha256
from ami_dist.disk import free_bytes, is_disk_full, tree_bytes
from ami_dist.errors import ConfigError, DataError, UserError
from ami_dist.progress import progress_bar

CHUNK_PAIRS = 20_000  # pairs per encoding task
# Settings that shape the prepared ids (besides the inputs and the vocabulary): a change prepares anew.
DATA_SETTINGS = ("format", "lowercase", "max_src_len", "max_tgt_len", "max_line_chars", "valid_limit")
DIALOG_SETTINGS = ("max_history_turns", "include_persona")


def input_files(cfg: Config) -> dict[str, str]:
    """The raw files of the corpus by config key (train_src, ... or train_file, valid_file)."""
    keys = ("train_src", "train_tgt", "valid_src", "valid_tgt") if cfg.data.format == "parallel" else (
        "train_file", "valid_file")
    return {key: getattr(cfg.data, key) for key in keys}


def settings(cfg: Config) -> dict[str, Any]:
    """The ``data.*`` values the prepared ids depend on."""
    keys = DATA_SETTINGS + (DIALOG_SETTINGS if cfg.data.format == "personachat" else ())
    return {f"data.{key}": getattr(cfg.data, key) for key in keys}


def vocab_settings(cfg: Config, vocab_file: Path | None) -> dict[str, Any]:
    """How the vocabulary comes to be: trained (with what), or read from a file (which, by content)."""
    vocab = cfg.vocab
    if vocab_file is not None:
        return {"vocab.kind": vocab.kind, "vocab.model_sha256": sha256_file(vocab_file)}
    spec: dict[str, Any] = {"vocab.kind": vocab.kind, "vocab.size": vocab.size}
    if vocab.kind == "sentencepiece":
        spec.update({"vocab.character_coverage": vocab.character_coverage, "vocab.sample_size": vocab.sample_size,
                     "vocab.sample_seed": vocab.sample_seed})
    return spec


def cache_root(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run.output_dir) / ".prepared"


def _digest(path: str, cache: Path) -> str:
    """sha256 of ``path``, remembered beside the cache while the file's size and mtime stay the same."""
    stat = os.stat(path)
    record = cache / "digests" / (hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32] + ".json")
    stamp = {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}) + "\n", encoding="utf-8")
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache still works, it only hashes again next time
    return digest


@dataclass
class Spec:
    """Everything the prepared ids depend on, and the key (a hash of it) they are found by."""

    inputs: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    vocab: dict[str, Any]
    key: str = field(init=False)

    def __post_init__(self) -> None:
        content = {"format": PREPARED_FORMAT, "inputs": {k: v["sha256"] for k, v in self.inputs.items()},
                   "settings": self.settings, "vocab": self.vocab}
        self.key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def make_spec(cfg: Config, vocab_file: Path | None = None) -> Spec:
    """The spec of ``cfg``'s corpus; missing or unreadable inputs are DataErrors naming the file."""
    cache = cache_root(cfg)
    inputs = {}
    for key, path in input_files(cfg).items():
        open_text_file(path).close()  # a missing file or a directory: the readers' own error
        inputs[key] = {"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                       "sha256": _digest(path, cache)}
    return Spec(inputs, settings(cfg), vocab_settings(cfg, vocab_file))


def find_prepared(cfg: Config, vocab_file: Path | None = None) -> Path | None:
    """The complete prepared directory of ``cfg``'s corpus in the cache, or None (nothing is built)."""
    path = cache_root(cfg) / make_spec(cfg, vocab_file).key
    return path if (path / MANIFEST).is_file() else None


# --- the encoding workers -----------------------------------------------------------------------------

_worker_vocab: Vocab | None = None


def _init_worker(kind: str, blob: bytes) -> None:
    global _worker_vocab
    _worker_vocab = vocab_from_bytes(kind, blob)


def _flat(ids: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat.astype(dtype), lengths


def _encode_chunk(pairs: list[tuple[str, str]], dtype_name: str, vocab: Vocab | None = None) -> tuple[np.ndarray, ...]:
    vocab = vocab or _worker_vocab
    assert vocab is not None
    dtype = np.dtype(dtype_name)
    src = _flat(vocab.encode_batch([s for s, _ in pairs]), dtype)
    tgt = _flat(vocab.encode_batch([t for _, t in pairs]), dtype)
    return (*src, *tgt)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _encoded(chunks: Iterator[list[tuple[str, str]]], vocab: Vocab, dtype: str, workers: int,
             in_process: bool) -> Iterator[tuple[np.ndarray, ...]]:
    """Each chunk's ids, in order; at most 2 chunks per worker in flight, so memory stays flat."""
    if in_process or workers <= 1:
        for chunk in chunks:
            yield _encode_chunk(chunk, dtype, vocab)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with context.Pool(workers, initializer=_init_worker, initargs=(vocab.kind, vocab.to_bytes())) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk, dtype)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitWriter:
    """Appends encoded chunks to a split's ``.bin`` files, keeping the lengths for its offsets."""

    def __init__(self, root: Path, split: str, max_src: int | None, max_tgt: int | None) -> None:
        self.root, self.split = root, split
        self.limits = (max_src, max_tgt)
        self.files = {side: open(root / bin_name(split, side), "wb") for side in SIDES}
        self.lengths: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
        self.read = 0
        self.dropped = Counter()

    def add(self, src: np.ndarray, src_len: np.ndarray, tgt: np.ndarray, tgt_len: np.ndarray) -> None:
        self.read += len(src_len)
        too_long = [np.zeros(len(src_len), bool) if limit is None else lengths > limit
                    for limit, lengths in zip(self.limits, (src_len, tgt_len), strict=True)]
        keep = ~(too_long[0] | too_long[1])
        self.dropped["source"] += int((too_long[0] & ~too_long[1]).sum())
        self.dropped["target"] += int((too_long[1] & ~too_long[0]).sum())
        self.dropped["both"] += int((too_long[0] & too_long[1]).sum())
        for side, flat, lengths in (("src", src, src_len), ("tgt", tgt, tgt_len)):
            if not keep.all():
                flat, lengths = flat[np.repeat(keep, lengths)], lengths[keep]
            flat.tofile(self.files[side])
            self.lengths[side].append(lengths)

    def close(self) -> dict[str, Any]:
        tokens, pairs = {}, 0
        for side in SIDES:
            self.files[side].close()
            lengths = np.concatenate(self.lengths[side]) if self.lengths[side] else np.zeros(0, np.int32)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, dtype=np.int64, out=offsets[1:])  # int64: past 2**31 tokens
            np.save(self.root / offsets_name(self.split, side), offsets)
            tokens[side], pairs = int(offsets[-1]), len(lengths)
        return {"pairs": pairs, "read": self.read, "tokens": tokens,
                "dropped_too_long": {"source": self.dropped["source"], "target": self.dropped["target"],
                                     "both": self.dropped["both"]}}


# --- reading the training corpus ------------------------------------------------------------------------


def _sample_mask(n: int, quota: int, seed: int, side: int) -> np.ndarray | None:
    """Which of ``n`` lines go into the vocabulary sample: None for all of them (n ≤ quota)."""
    if n <= quota:
        return None
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, side]).choice(n, size=quota, replace=False)] = True
    return mask


@dataclass
class _Scan:
    pairs: int = 0
    sample: list[str] = field(default_factory=list)  # sentencepiece: the sentences it trains on
    counts: Counter = field(default_factory=Counter)  # word vocabulary: every token's count


def _collect(scan: _Scan, lines: Iterable[str], mask: np.ndarray | None, cfg: Config, train_vocab: bool) -> int:
    n = 0
    words = cfg.vocab.kind == "words"
    for n, line in enumerate(lines, start=1):
        if not train_vocab:
            continue
        if words:
            scan.counts.update(tokenize(line))
        elif mask is None or mask[n - 1]:
            scan.sample.append(line)
    return n


def _progress(total: int | None, desc: str, show: bool, unit: str = " lines") -> tqdm:
    return progress_bar(show, total=total, desc=desc, unit=unit, unit_scale=True, mininterval=1.0,
                        dynamic_ncols=True)


def _lowered(lines: Iterable[str], lower: bool) -> Iterator[str]:
    return (line.lower() for line in lines) if lower else iter(lines)


def _scan_train(cfg: Config, train_vocab: bool, show: bool) -> tuple[_Scan, list[tuple[str, str]] | None]:
    """Check every training line; collect what the vocabulary is built from. Dialog files (which must be
    parsed whole into episodes) come back as their pairs; parallel text is streamed and not kept."""
    data, scan = cfg.data, _Scan()
    quota = max(1, cfg.vocab.sample_size // 2)
    if data.format == "personachat":
        pairs = read_split(data, "train")
        for side in (0, 1):
            mask = _sample_mask(len(pairs), quota, cfg.vocab.sample_seed, side)
            _collect(scan, (p[side] for p in pairs), mask, cfg, train_vocab)
        scan.pairs = len(pairs)
        return scan, pairs
    counts = []
    for side, key in enumerate(("train_src", "train_tgt")):
        path = getattr(data, key)
        n = count_lines(path)
        mask = _sample_mask(n, quota, cfg.vocab.sample_seed, side)
        with _progress(n, f"check {Path(path).name}", show) as bar:
            lines = _lowered(iter_lines(path, max_chars=data.max_line_chars), data.lowercase)
            counts.append(_collect(scan, _ticking(lines, bar), mask, cfg, train_vocab))
    if counts[0] != counts[1]:
        raise DataError(f"{data.train_src} has {counts[0]} lines but {data.train_tgt} has {counts[1]}: "
                        "source and target files must be aligned line by line")
    scan.pairs = counts[0]
    return scan, None


def _ticking(items: Iterable[Any], bar: tqdm, every: int = 4096) -> Iterator[Any]:
    n = 0
    for n, item in enumerate(items, start=1):
        if n % every == 0:
            bar.update(every)
        yield item
    bar.update(n % every)


def _train_pairs(cfg: Config, pairs: list[tuple[str, str]] | None) -> Iterator[tuple[str, str]]:
    if pairs is not None:
        return iter(pairs)
    data = cfg.data
    sides = [_lowered(iter_lines(path, max_chars=data.max_line_chars), data.lowercase)
             for path in (data.train_src, data.train_tgt)]
    return zip(*sides, strict=True)


def _build_vocab(cfg: Config, scan: _Scan, vocab_file: Path | None) -> Vocab:
    if vocab_file is not None:
        return vocab_from_bytes(cfg.vocab.kind, Path(vocab_file).read_bytes())
    if cfg.vocab.kind == "words":
        return WordVocab.from_counts(scan.counts, cfg.vocab.size)
    return SentencePieceVocab.train(scan.sample, cfg.vocab.size, cfg.vocab.character_coverage,
                                    cfg.vocab.sample_seed)


def _workers(requested: int) -> int:
    return requested or len(os.sched_getaffinity(0))


def _write(cfg: Config, spec: Spec, root: Path, vocab_file: Path | None, show: bool) -> dict[str, Any]:
    """Prepare the corpus into ``root`` (an empty directory); returns the manifest."""
    started = time.perf_counter()
    scan, dialog_pairs = _scan_train(cfg, vocab_file is None, show)
    vocab = _build_vocab(cfg, scan, vocab_file)
    (root / VOCAB_FILES[vocab.kind]).write_bytes(vocab.to_bytes())
    dtype = "uint16" if len(vocab) <= 1 << 16 else "uint32"
    workers = _workers(cfg.data.prepare_workers)
    if cfg.fault.prepare_delay_s:
        time.sleep(cfg.fault.prepare_delay_s)
    splits = {}
    writer = _SplitWriter(root, "train", cfg.data.max_src_len, cfg.data.max_tgt_len)
    with _progress(scan.pairs, "encode", show, " pairs") as bar:
        chunks = _batched(_train_pairs(cfg, dialog_pairs), CHUNK_PAIRS)
        for encoded in _encoded(chunks, vocab, dtype, workers, in_process=scan.pairs <= 2 * CHUNK_PAIRS):
            writer.add(*encoded)
            bar.update(len(encoded[1]))
    splits["train"] = writer.close()
    if splits["train"]["pairs"] == 0:
        raise UserError(f"data.max_src_len / data.max_tgt_len: all {scan.pairs} training pairs are longer than "
                        "the limits")
    valid_pairs = read_split(cfg.data, "valid")
    writer = _SplitWriter(root, "valid", None, None)  # validation pairs are never dropped
    writer.add(*_encode_chunk(valid_pairs, dtype, vocab))
    splits["valid"] = writer.close()
    with open(root / "valid.pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(list(pair), ensure_ascii=False) + "\n" for pair in valid_pairs)
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}
    vocab_info = {"kind": vocab.kind, "file": VOCAB_FILES[vocab.kind], "size": len(vocab),
                  "sha256": vocab_sha256(vocab),
                  "source": "given" if vocab_file is not None else "trained"}
    if vocab_file is None and vocab.kind == "sentencepiece":
        vocab_info["trained_on_sentences"] = len(scan.sample)
    return {"format": "ami-dist prepared corpus", "version": PREPARED_FORMAT, "key": spec.key,
            "ami_dist_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(), "seconds": round(time.perf_counter() - started, 2), "workers": workers,
            "inputs": spec.inputs, "settings": spec.settings, "vocab_settings": spec.vocab, "vocab": vocab_info,
            "dtype": dtype, "splits": splits, "files": files}


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX record lock: also honoured over NFS); where the filesystem has no
    locks, none: the atomic rename still keeps the result whole."""
    with open(path, "a+") as f:
        try:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process preparing the same corpus (lock {path})", flush=True)
                fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield


def prepare(cfg: Config, out: Path | None = None, vocab_file: Path | None = None, show: bool = True) -> Path:
    """The prepared directory of ``cfg``'s corpus: found in the cache, or prepared now (into ``out`` if
    given, else the cache). Bad input is a UserError; a failed preparation leaves nothing behind.

    A line says when this process starts preparing, waits for another, and finishes; ``show`` adds progress
    bars (lines/s, pairs/s)."""
    spec = make_spec(cfg, vocab_file)
    final = Path(out) if out is not None else cache_root(cfg) / spec.key
    if (final / MANIFEST).is_file() and _matches(final, spec):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    error_file = final.parent / f".{final.name}.error"
    asked = time.time()
    with _locked(final.parent / f".{final.name}.lock"):
        if (final / MANIFEST).is_file() and _matches(final, spec):
            return final  # another process prepared it while this one waited
        if error_file.is_file() and error_file.stat().st_mtime >= asked:
            raise DataError(error_file.read_text(encoding="utf-8").strip())  # it failed while we waited
        if final.exists():
            if out is None:
                read_manifest(final)  # names what is wrong with it, if it can
                raise DataError(f"{final}: a prepared directory of other inputs or settings where this corpus "
                                "belongs; delete it to prepare again")
            if any(final.iterdir()):
                raise UserError(f"--out {final}: exists and is not a prepared directory of this corpus and "
                                "settings; choose a new path or delete it")
            final.rmdir()
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed preparer of this key
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.mkdir()
        try:
            print(f"preparing {', '.join(v['path'] for v in spec.inputs.values())} -> {final}", flush=True)
            manifest = _write(cfg, spec, tmp, vocab_file, show)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError as e:  # another machine finished first (shared filesystem without locks)
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        except UserError as e:
            error_file.write_text(str(e) + "\n", encoding="utf-8")
            raise
        except OSError as e:
            if not is_disk_full(e, final.parent):
                raise
            free, written = free_bytes(final.parent), tree_bytes(tmp)
            corpus = sum(v["bytes"] for v in spec.inputs.values())
            raise UserError(f"{final.parent}: no space left on the device preparing the corpus ({corpus / 2**20:.1f} "
                            f"MiB of text; it ran out after writing {written / 2**20:.1f} MiB, {free / 2**20:.1f} MiB "
                            "free): set data.cache_dir to a directory with room, or free space there") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        train = read_manifest(final)["splits"]["train"]
        print(f"prepared {train['pairs']} training pairs ({sum(train['dropped_too_long'].values())} dropped as too "
              f"long) in {final}", flush=True)
    return final


def _matches(root: Path, spec: Spec) -> bool:
    try:
        return read_manifest(root).get("key") == spec.key
    except DataError:
        return False


def check_settings(cfg: Config, manifest: dict[str, Any], root: Path) -> None:
    """A prepared directory given as ``data.prepared`` must have been made with this config's settings."""
    wanted = {**settings(cfg), "vocab.kind": cfg.vocab.kind}
    made = {**manifest.get("settings", {}), "vocab.kind": manifest["vocab"]["kind"]}
    for key, value in wanted.items():
        if key in made and made[key] != value:
            raise ConfigError(f"{key}: {root} was prepared with {made[key]!r}, this config says {value!r} (set "
                              f"{key}={made[key]!r}, or prepare again with ami-prepare)")


def ensure_prepared(cfg: Config, run_vocab: Path | None = None, show: bool = True) -> Path:
    """The prepared directory a run trains on: ``data.prepared``, or the raw corpus prepared into the cache.

    ``run_vocab`` is the vocabulary file of a run that continues: the prepared ids must be in it. The cached
    directory of the original settings is used when its vocabulary is that one; otherwise the corpus is
    prepared again with that file as its vocabulary (never by training a new one).
    """
    if cfg.data.prepared is not None:
        root = Path(cfg.data.prepared)
        manifest = read_manifest(root)
        check_settings(cfg, manifest, root)
        if run_vocab is not None and sha256_file(run_vocab) != manifest["vocab"]["sha256"]:
            raise UserError(f"data.prepared: {root} is encoded with vocabulary {manifest['vocab']['sha256'][:12]}, "
                            f"the run's {run_vocab} is {sha256_file(run_vocab)[:12]}; a run continues with its own "
                            "vocabulary")
        return root
    given = Path(cfg.vocab.model) if cfg.vocab.model is not None else None
    if run_vocab is None:
        return prepare(cfg, vocab_file=given, show=show)
    found = find_prepared(cfg, given)
    if found is not None and read_manifest(found)["vocab"]["sha256"] == sha256_file(run_vocab):
        return found
    return prepare(cfg, vocab_file=run_vocab, show=show)


def check_enough_pairs(cfg: Config, root: Path, world_size: int) -> None:
    """Every rank needs a pair of every step: fewer training pairs than ranks is a UserError (before the
    ranks meet) naming the corpus and the counts."""
    train = read_manifest(root)["splits"]["train"]
    if train["pairs"] >= world_size:
        return
    source = cfg.data.prepared or (cfg.data.train_src if cfg.data.format == "parallel" else cfg.data.train_file)
    dropped = sum(train["dropped_too_long"].values())
    raise DataError(f"{source}: {train['pairs']} training pairs ({dropped} dropped as too long) for {world_size} "
                    f"ranks; every rank needs at least one pair a step")
