"""A prepared corpus on disk, and the read-only views every rank maps of it.

Layout of a prepared directory (written by :mod:`ami_dist.data.prepare`)::

    manifest.json            what was prepared from what: inputs' sha256, settings, vocabulary, counts, files
    spm.model | vocab.txt    the vocabulary the ids are in
    train.src.bin            token ids of every kept training source, end to end (uint16, or uint32 past 65,536)
    train.src.offsets.npy    int64, pairs + 1 entries: pair i's source is bin[offsets[i]:offsets[i + 1]]
    train.tgt.bin / .offsets.npy, valid.src.* / valid.tgt.*   the same for the other side and split
    valid.pairs.jsonl        the validation pairs' text, the references BLEU is computed against

Ranks open the ``.bin`` and ``.offsets.npy`` files with ``numpy`` memory maps: the pages are the operating
system's page cache, one copy per machine however many ranks read them, and only the per-example length
arrays (4 bytes a sentence) are private to a rank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ami_dist.data.corpus import Split
from ami_dist.data.vocab import Vocab, vocab_from_bytes
from ami_dist.errors import DataError

PREPARED_FORMAT = 1
MANIFEST = "manifest.json"
SIDES = ("src", "tgt")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def bin_name(split: str, side: str) -> str:
    return f"{split}.{side}.bin"


def offsets_name(split: str, side: str) -> str:
    return f"{split}.{side}.offsets.npy"


class TokenArray(Sequence):
    """Sentence ``i``'s token ids as a view into a memory-mapped flat array (nothing is copied)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("TokenArray takes one index at a time")
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Every sentence's length (int32: the one per-example array a rank holds in its own memory)."""
        return np.diff(self.offsets).astype(np.int32)


@dataclass
class PreparedData:
    root: Path
    manifest: dict[str, Any]
    vocab: Vocab
    train: Split  # memory-mapped ids, no text
    valid: Split  # small: ids and text in memory

    @property
    def vocab_sha256(self) -> str:
        return self.manifest["vocab"]["sha256"]


def _fail(root: Path, what: str) -> DataError:
    return DataError(f"{root}: {what} (a prepared directory is written by ami-prepare; delete this one to "
                     "prepare the corpus again)")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory, checked against the files beside it (sizes, not contents)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise _fail(root, f"no {MANIFEST}: not a prepared directory, or its preparation never finished")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != PREPARED_FORMAT:
        found = manifest.get("version") if isinstance(manifest, dict) else None
        raise _fail(path, f"prepared-data format {found!r}, this ami-dist reads format {PREPARED_FORMAT}")
    try:
        files: dict[str, int] = manifest["files"]
        vocab_file, vocab_sha = manifest["vocab"]["file"], manifest["vocab"]["sha256"]
        for split in ("train", "valid"):
            manifest["splits"][split]["pairs"]
    except (KeyError, TypeError) as e:
        raise _fail(path, f"no entry {e} in the manifest") from None
    for name, size in files.items():
        file = root / name
        if not file.is_file():
            raise _fail(root, f"{name} is missing")
        if file.stat().st_size != size:
            raise _fail(root, f"{name} has {file.stat().st_size} bytes, the manifest says {size} (truncated or "
                        "replaced?)")
    if sha256_file(root / vocab_file) != vocab_sha:
        raise _fail(root, f"{vocab_file} is not the vocabulary the ids were encoded with (sha256 differs from "
                    "the manifest's)")
    return manifest


def _token_array(root: Path, manifest: dict[str, Any], split: str, side: str) -> TokenArray:
    dtype = np.dtype(manifest["dtype"])
    data = np.memmap(root / bin_name(split, side), dtype=dtype, mode="r") if (
        root / bin_name(split, side)).stat().st_size else np.zeros(0, dtype=dtype)
    offsets = np.load(root / offsets_name(split, side), mmap_mode="r")
    pairs = manifest["splits"][split]["pairs"]
    if offsets.shape != (pairs + 1,) or int(offsets[-1]) != len(data) or int(offsets[0]) != 0:
        raise _fail(root, f"{offsets_name(split, side)} does not index {bin_name(split, side)} "
                    f"({pairs} pairs expected)")
    return TokenArray(data, offsets)


def open_prepared(root: str | Path) -> PreparedData:
    """Map a prepared directory: training ids stay on disk (page cache), validation is read into memory."""
    root = Path(root)
    manifest = read_manifest(root)
    vocab_info = manifest["vocab"]
    vocab = vocab_from_bytes(vocab_info["kind"], (root / vocab_info["file"]).read_bytes())
    train = Split(None, *(_token_array(root, manifest, "train", side) for side in SIDES))
    valid_ids = [_token_array(root, manifest, "valid", side) for side in SIDES]
    lines = (root / "valid.pairs.jsonl").read_text(encoding="utf-8").splitlines()
    pairs = [tuple(json.loads(line)) for line in lines]
    if len(pairs) != len(valid_ids[0]):
        raise _fail(root, f"valid.pairs.jsonl has {len(pairs)} pairs, the ids {len(valid_ids[0])}")
    valid = Split(pairs, *([ids[i].tolist() for i in range(len(ids))] for ids in valid_ids))
    return PreparedData(root, manifest, vocab, train, valid)
