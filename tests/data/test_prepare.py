"""The prepare step: the ids it writes are the ids the in-memory path computes, its output is complete or
absent and never redone for the same inputs, its errors are the readers' errors, and a damaged or
mismatched prepared directory is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ami_dist.config import load_config
from ami_dist.data import prepare as prep
from ami_dist.data.corpus import encode_split, read_split
from ami_dist.data.prepared import open_prepared, read_manifest
from ami_dist.data.vocab import train_vocab
from ami_dist.errors import ConfigError, DataError, UserError
from tests.conftest import DATA, tiny_config, write_config


def _config(tmp_path: Path, name: str = "run.yaml", **sections: dict):
    cfg = tiny_config(tmp_path, **sections)
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    return load_config(write_config(tmp_path, cfg, name), [])


def _dialog(tmp_path: Path, **data: object):
    return _config(tmp_path, "dialog.yaml", data={
        "format": "personachat", "train_src": None, "train_tgt": None, "valid_src": None, "valid_tgt": None,
        "train_file": str(DATA / "personachat/train.txt"), "valid_file": str(DATA / "personachat/valid.txt"),
        "max_history_turns": 3, "valid_limit": 50, **data}, vocab={"kind": "words", "size": 3000})


def _in_memory(cfg):
    """The path every rank took before the prepare step: read, train the vocabulary, encode."""
    train_pairs, valid_pairs = read_split(cfg.data, "train"), read_split(cfg.data, "valid")
    vocab = train_vocab(cfg.vocab.kind, [s for s, _ in train_pairs] + [t for _, t in train_pairs], cfg.vocab.size,
                        cfg.vocab.character_coverage)
    train, dropped = encode_split(train_pairs, vocab, cfg.data.max_src_len, cfg.data.max_tgt_len)
    valid, _ = encode_split(valid_pairs, vocab)
    return vocab, train, valid, dropped


def _assert_same_ids(prepared, train, valid) -> None:
    assert len(prepared.train) == len(train)
    for mapped, listed in ((prepared.train.src_ids, train.src_ids), (prepared.train.tgt_ids, train.tgt_ids)):
        assert all(mapped[i].tolist() == listed[i] for i in range(len(listed)))
    assert prepared.valid.src_ids == valid.src_ids and prepared.valid.tgt_ids == valid.tgt_ids
    assert prepared.valid.pairs == valid.pairs


@pytest.mark.parametrize("kind", ["sentencepiece", "words"])
def test_prepared_ids_equal_the_in_memory_path_parallel(tmp_path: Path, kind: str, monkeypatch) -> None:
    cfg = _config(tmp_path, vocab={"kind": kind, "size": 1000}, data={"max_src_len": 12, "max_tgt_len": 14})
    monkeypatch.setattr(prep, "CHUNK_PAIRS", 3000)  # 20,000 pairs: 7 chunks over 2 worker processes
    cfg.data.prepare_workers = 2
    prepared = open_prepared(prep.prepare(cfg, show=False))
    vocab, train, valid, dropped = _in_memory(cfg)
    assert prepared.vocab.to_bytes() == vocab.to_bytes()
    _assert_same_ids(prepared, train, valid)
    counts = prepared.manifest["splits"]["train"]["dropped_too_long"]
    assert dropped > 0 and sum(counts.values()) == dropped
    assert prepared.manifest["workers"] == 2
    assert prepared.train.src_ids.data.dtype == np.uint16


def test_prepared_ids_equal_the_in_memory_path_dialog(tmp_path: Path) -> None:
    cfg = _dialog(tmp_path)
    prepared = open_prepared(prep.prepare(cfg, show=False))
    vocab, train, valid, _ = _in_memory(cfg)
    assert prepared.vocab.to_bytes() == vocab.to_bytes()
    _assert_same_ids(prepared, train, valid)


def test_vocabulary_sample_is_seeded(tmp_path: Path) -> None:
    cfg = _config(tmp_path, vocab={"size": 600, "sample_size": 6000})
    first = open_prepared(prep.prepare(cfg, tmp_path / "a", show=False))
    again = open_prepared(prep.prepare(cfg, tmp_path / "b", show=False))
    cfg.vocab.sample_seed = 1
    other = open_prepared(prep.prepare(cfg, tmp_path / "c", show=False))
    assert first.manifest["vocab"]["trained_on_sentences"] == 6000
    assert first.vocab.to_bytes() == again.vocab.to_bytes()
    assert first.vocab.to_bytes() != other.vocab.to_bytes()


def test_prepare_is_idempotent_and_keyed_by_inputs_and_settings(tmp_path: Path, monkeypatch) -> None:
    cfg = _config(tmp_path)
    root = prep.prepare(cfg, show=False)
    assert root.parent == tmp_path / "cache"

    def must_not_run(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prep, "_write", must_not_run)
    assert prep.prepare(cfg, show=False) == root
    monkeypatch.undo()
    cfg.data.max_src_len = 20  # another setting: another key
    assert prep.prepare(cfg, show=False) != root


def test_a_failed_prepare_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    cfg = _config(tmp_path)
    calls = []

    def fail_second(chunk, dtype, vocab=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return original(chunk, dtype, vocab)

    original = prep._encode_chunk
    cfg.data.prepare_workers = 1  # encoded in this process, where the patched function runs
    monkeypatch.setattr(prep, "CHUNK_PAIRS", 5000)
    monkeypatch.setattr(prep, "_encode_chunk", fail_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prep.prepare(cfg, show=False)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "digests"]
    assert prep.find_prepared(cfg) is None


def _cases(tmp: Path) -> list[tuple[str, dict]]:
    valid = (DATA / "tatoeba_en_de/valid.en").read_bytes().split(b"\n")
    latin = list(valid)
    latin[41] = b"caf\xe9 latin-1"
    gap = list(valid)
    gap[4] = b"   "
    files = {"short.de": b"eins\nzwei\n", "empty.en": b"  \n\n", "latin1.en": b"\n".join(latin),
             "gap.en": b"\n".join(gap), "long.en": b"ok\n" + b"x" * 20000 + b"\n",
             "d.txt": b"1 your persona: i like tea.\n2 hi\thello\n3 no tab here\n"}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return [
        ("mismatched", {"train_tgt": str(tmp / "short.de")}),
        ("empty file", {"train_src": str(tmp / "empty.en")}),
        ("invalid UTF-8 in training", {"train_src": str(tmp / "latin1.en"), "train_tgt": str(tmp / "latin1.en")}),
        ("empty line in validation", {"valid_src": str(tmp / "gap.en")}),
        ("over-long line", {"train_src": str(tmp / "long.en"), "train_tgt": str(tmp / "long.en")}),
        ("dialog", {"format": "personachat", "train_file": str(tmp / "d.txt"),
                    "valid_file": str(DATA / "personachat/valid.txt")}),
    ]


def test_bad_raw_input_fails_in_prepare_with_the_readers_message(tmp_path: Path) -> None:
    for name, data in _cases(tmp_path):
        cfg = _config(tmp_path, data=data)
        with pytest.raises(DataError) as today:
            for split in ("train", "valid"):
                read_split(cfg.data, split)
        with pytest.raises(DataError) as prepared:
            prep.prepare(cfg, show=False)
        assert str(prepared.value) == str(today.value), name
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "digests"]


def _damaged(root: Path, how: str) -> None:
    if how == "truncated ids":
        data = (root / "train.src.bin").read_bytes()
        (root / "train.src.bin").write_bytes(data[:-10])
    elif how == "missing offsets":
        (root / "train.tgt.offsets.npy").unlink()
    elif how == "replaced vocabulary":
        data = (root / "spm.model").read_bytes()
        (root / "spm.model").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif how == "no manifest":
        (root / "manifest.json").unlink()
    elif how == "offsets that do not index the ids":
        offsets = np.load(root / "train.src.offsets.npy")
        offsets[-1] -= 1
        np.save(root / "train.src.offsets.npy", offsets)
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["files"]["train.src.offsets.npy"] = (root / "train.src.offsets.npy").stat().st_size
        (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["truncated ids", "missing offsets", "replaced vocabulary", "no manifest",
                                 "offsets that do not index the ids"])
def test_a_damaged_prepared_directory_is_refused(tmp_path: Path, how: str) -> None:
    root = prep.prepare(_config(tmp_path), tmp_path / "prepared", show=False)
    _damaged(root, how)
    with pytest.raises(DataError, match=rf"^{root}.*(ami-prepare|delete)"):
        open_prepared(root)


def test_data_prepared_must_match_the_config(tmp_path: Path) -> None:
    root = prep.prepare(_config(tmp_path), tmp_path / "prepared", show=False)
    cfg = load_config(write_config(tmp_path, {**tiny_config(tmp_path), "data": {
        "prepared": str(root), "max_src_len": 50, "valid_limit": 64}}, "on_prepared.yaml"), [])
    with pytest.raises(ConfigError, match=r"data\.max_src_len: .* was prepared with 100, this config says 50"):
        prep.ensure_prepared(cfg)
    cfg.data.max_src_len = 100
    assert prep.ensure_prepared(cfg) == root
    other = tmp_path / "other.model"
    other.write_bytes(b"not this one")
    with pytest.raises(UserError, match="a run continues with its own vocabulary"):
        prep.ensure_prepared(cfg, run_vocab=other)


def test_a_continuing_run_never_trains_a_vocabulary(tmp_path: Path, monkeypatch) -> None:
    cfg = _config(tmp_path)
    first = prep.prepare(cfg, show=False)
    run_vocab = tmp_path / "spm.model"
    run_vocab.write_bytes((first / "spm.model").read_bytes())

    def no_training(*args, **kwargs):
        raise AssertionError("the vocabulary was trained again")

    monkeypatch.setattr(prep.SentencePieceVocab, "train", no_training)
    assert prep.ensure_prepared(cfg, run_vocab) == first  # the cache has it: used as it is
    import shutil

    shutil.rmtree(first)  # the cache was cleared: encoded again, with the run's own vocabulary
    again = prep.ensure_prepared(cfg, run_vocab)
    manifest = read_manifest(again)
    assert manifest["vocab"]["source"] == "given"
    assert (again / "spm.model").read_bytes() == run_vocab.read_bytes()
