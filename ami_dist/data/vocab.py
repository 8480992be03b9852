"""The vocabulary shared by the forward (S→T) and backward (T→S) networks.

Two kinds: a sentencepiece BPE model trained on both sides of the training data (NMT), and a word list
over the paper's dialog tokenisation (dialog). Both serialise to bytes so rank 0 can build the vocabulary
once and broadcast it, which works whether or not the nodes share a filesystem.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import sentencepiece as spm

from ami_dist.data.dialog import TURN_SEPARATOR, tokenize
from ami_dist.errors import ConfigError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
VOCAB_FILES = {"sentencepiece": "spm.model", "words": "vocab.txt"}  # the vocabulary's file in a run directory


class Vocab(Protocol):
    kind: str
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int

    def __len__(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_bytes(self) -> bytes: ...


class SentencePieceVocab:
    """A sentencepiece model with ids 0..3 = pad, unk, bos, eos."""

    kind = "sentencepiece"
    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def __init__(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD, UNK, BOS, EOS):
            raise ConfigError(
                f"vocab.model: the sentencepiece model has pad/unk/bos/eos ids {ids}, expected (0, 1, 2, 3) "
                "(train it with --pad_id=0 --unk_id=1 --bos_id=2 --eos_id=3)"
            )

    @classmethod
    def train(cls, sentences: list[str], size: int, character_coverage: float = 1.0,
              seed: int = 0) -> SentencePieceVocab:
        """Train a BPE model on all of ``sentences`` (the caller samples a large corpus; see the prepare
        step); a size the data cannot support is a ConfigError on vocab.size. ``seed`` is sentencepiece's
        own random seed, so the same sentences always give the same model."""
        writer = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=writer,
                vocab_size=size,
                model_type="bpe",
                character_coverage=character_coverage,
                pad_id=PAD,
                unk_id=UNK,
                bos_id=BOS,
                eos_id=EOS,
                input_sentence_size=max(len(sentences), 1),  # every sentence given: no sampling inside
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:
            if "Vocabulary size" not in str(e):
                raise
            message = str(e).split("]")[-1].strip()
            raise ConfigError(f"vocab.size: sentencepiece cannot train a {size}-piece model on this data: "
                              f"{message}") from None
        return cls(writer.getvalue())

    def __len__(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def to_bytes(self) -> bytes:
        return self._proto


class WordVocab:
    """Words from the paper's dialog tokenisation (split on spaces and punctuation), most frequent first."""

    kind = "words"
    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def __init__(self, words: list[str]) -> None:
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ConfigError(f"vocab.model: a word list must start with {', '.join(SPECIALS)}")
        self._words = list(words)
        self._index = {w: i for i, w in enumerate(self._words)}

    @classmethod
    def train(cls, sentences: Iterable[str], size: int) -> WordVocab:
        return cls.from_counts(Counter(tok for s in sentences for tok in tokenize(s)), size)

    @classmethod
    def from_counts(cls, counts: Counter[str], size: int) -> WordVocab:
        """The ``size`` most frequent words (ties by spelling) after the special tokens."""
        counts = Counter(counts)
        extra = [TURN_SEPARATOR]
        for tok in extra:
            counts.pop(tok, None)
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        room = max(0, size - len(SPECIALS) - len(extra))
        return cls([*SPECIALS, *extra, *ranked[:room]])

    def __len__(self) -> int:
        return len(self._words)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(tok, UNK) for tok in tokenize(text)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self._words[int(i)] for i in ids if int(i) >= len(SPECIALS) or int(i) == UNK)

    def to_bytes(self) -> bytes:
        return "\n".join(self._words).encode("utf-8") + b"\n"


def vocab_sha256(vocab: Vocab) -> str:
    """The vocabulary's identity: sha256 of its serialised bytes (its file in a run or prepared directory)."""
    return hashlib.sha256(vocab.to_bytes()).hexdigest()


def vocab_from_bytes(kind: str, data: bytes) -> Vocab:
    """Rebuild a vocabulary from :meth:`Vocab.to_bytes` output."""
    if kind == "sentencepiece":
        return SentencePieceVocab(data)
    if kind == "words":
        return WordVocab(data.decode("utf-8").rstrip("\n").split("\n"))
    raise ValueError(f"unknown vocabulary kind {kind!r}")


def train_vocab(kind: str, sentences: list[str], size: int, character_coverage: float = 1.0, seed: int = 0) -> Vocab:
    """Build the shared vocabulary from the training sentences of both sides (deterministic for the data)."""
    if kind == "sentencepiece":
        return SentencePieceVocab.train(sentences, size, character_coverage, seed)
    return WordVocab.train(sentences, size)
