"""The corpus of a run: raw (source, target) text pairs of each split, and their token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ami_dist.config.schema import DataConfig
from ami_dist.data.dialog import dialog_pairs, read_personachat
from ami_dist.data.parallel import read_parallel
from ami_dist.data.vocab import Vocab


@dataclass
class Split:
    """One split: its token ids under the shared vocabulary and, where kept, the raw text pairs.

    ``src_ids[i]`` / ``tgt_ids[i]`` are sequences of ints: Python lists for data read in memory, views into
    memory-mapped arrays for a prepared training corpus (:mod:`ami_dist.data.prepared`), which keeps no text
    (``pairs`` is None); validation splits keep their text, the references BLEU is computed against.
    """

    pairs: list[tuple[str, str]] | None
    src_ids: Sequence[Sequence[int]]
    tgt_ids: Sequence[Sequence[int]]

    def __len__(self) -> int:
        return len(self.src_ids)

    def reversed(self) -> Split:
        """The same pairs seen by the backward network (T→S)."""
        pairs = None if self.pairs is None else [(t, s) for s, t in self.pairs]
        return Split(pairs, self.tgt_ids, self.src_ids)


def read_split(cfg: DataConfig, split: str) -> list[tuple[str, str]]:
    """Raw (source, target) pairs of ``split`` ("train" or "valid"); bad files raise DataError."""
    if cfg.format == "parallel":
        pairs = read_parallel(getattr(cfg, f"{split}_src"), getattr(cfg, f"{split}_tgt"), cfg.max_line_chars)
    else:
        episodes = read_personachat(getattr(cfg, f"{split}_file"), cfg.max_line_chars)
        pairs = dialog_pairs(episodes, cfg.max_history_turns, cfg.include_persona)
    if cfg.lowercase:
        pairs = [(s.lower(), t.lower()) for s, t in pairs]
    if split == "valid" and cfg.valid_limit:
        pairs = pairs[: cfg.valid_limit]
    return pairs


def encode_split(pairs: list[tuple[str, str]], vocab: Vocab, max_src_len: int | None = None,
                 max_tgt_len: int | None = None) -> tuple[Split, int]:
    """Encode pairs; with length limits (in tokens), over-long pairs are dropped. Returns the split and the
    number of pairs dropped (logged as the MLflow param ``train_pairs_dropped_too_long``)."""
    src_ids = vocab.encode_batch([s for s, _ in pairs])
    tgt_ids = vocab.encode_batch([t for _, t in pairs])
    keep = [
        i
        for i in range(len(pairs))
        if (max_src_len is None or len(src_ids[i]) <= max_src_len)
        and (max_tgt_len is None or len(tgt_ids[i]) <= max_tgt_len)
    ]
    split = Split([pairs[i] for i in keep], [src_ids[i] for i in keep], [tgt_ids[i] for i in keep])
    return split, len(pairs) - len(keep)
