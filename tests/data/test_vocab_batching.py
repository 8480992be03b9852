"""The shared vocabulary and length-bucketed, rank-sharded, resumable batching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ami_dist.data.batching import ShardedBucketSampler, make_batch
from ami_dist.data.parallel import read_parallel
from ami_dist.data.vocab import BOS, EOS, PAD, UNK, SentencePieceVocab, WordVocab, train_vocab, vocab_from_bytes
from ami_dist.errors import ConfigError
from tests.conftest import DATA


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return read_parallel(DATA / "tatoeba_en_de/train.en", DATA / "tatoeba_en_de/train.de")[:3000]


def test_sentencepiece_bpe_shared_vocab_round_trips(pairs: list[tuple[str, str]]) -> None:
    vocab = train_vocab("sentencepiece", [s for s, _ in pairs] + [t for _, t in pairs], 500)
    assert len(vocab) == 500
    assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (PAD, UNK, BOS, EOS)
    for text in ("Tom is here.", "Ich habe Hunger."):  # both languages in one vocabulary
        ids = vocab.encode(text)
        assert UNK not in ids and vocab.decode(ids) == text
    again = vocab_from_bytes("sentencepiece", vocab.to_bytes())
    assert again.encode("Where is Mary?") == vocab.encode("Where is Mary?")


def test_sentencepiece_size_too_large_is_a_config_error(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ConfigError, match=r"vocab\.size: sentencepiece cannot train a 100000-piece model"):
        SentencePieceVocab.train([s for s, _ in pairs[:200]], 100000)


def test_word_vocab_uses_dialog_tokenisation_and_frequency() -> None:
    vocab = WordVocab.train(["a b b c", "b c !", "c c"], size=7)
    # 4 specials + <sep> + the 2 most frequent words
    assert len(vocab) == 7
    assert vocab.encode("c b a!") == [5, 6, UNK, UNK]
    assert vocab.decode(vocab.encode("b c")) == "b c"
    assert vocab_from_bytes("words", vocab.to_bytes()).encode("c b") == vocab.encode("c b")


def test_make_batch_adds_bos_and_eos() -> None:
    batch = make_batch([[5, 6, 7], [8]], [[9], [10, 11]], PAD, BOS, EOS)
    assert batch.src.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch.src_lengths.tolist() == [3, 1]
    assert batch.tgt_in.tolist() == [[BOS, 9, PAD], [BOS, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS, PAD], [10, 11, EOS]]


def _lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 40, n).tolist(), rng.integers(1, 40, n).tolist()


def test_ranks_get_disjoint_equal_shares_covering_the_epoch() -> None:
    src, tgt = _lengths(1000)
    samplers = [ShardedBucketSampler(src, tgt, 16, rank=r, world=3, seed=5, bucket_batches=10) for r in range(3)]
    shares = [s.epoch_batches(0) for s in samplers]
    assert len({len(b) for b in shares}) == 1  # same number of batches on every rank (lockstep)
    assert len(shares[0]) == samplers[0].batches_per_epoch()
    seen = [i for share in shares for batch in share for i in batch]
    assert len(seen) == len(set(seen))  # no example on two ranks
    assert len(seen) >= 1000 - 2 * 16  # at most the tail that does not divide by the world is dropped


def test_the_ranks_of_a_step_get_batches_of_nearly_equal_length() -> None:
    """A rank given long sentences while another has short ones makes the other wait at the all-reduce."""
    src, tgt = _lengths(4000)
    samplers = [ShardedBucketSampler(src, tgt, 16, rank=r, world=2, seed=2, bucket_batches=20) for r in range(2)]
    shares = [s.epoch_batches(0) for s in samplers]
    tokens = np.array([[sum(src[i] + tgt[i] for i in batch) for batch in share] for share in shares])
    spread = np.abs(tokens[0] - tokens[1]) / tokens.mean(axis=0)
    assert spread.mean() < 0.05
    assert all(len(a) == len(b) for a, b in zip(*shares, strict=True))  # equal sentences per rank in every full step


def test_batches_are_length_bucketed() -> None:
    src, tgt = _lengths(2000)
    sampler = ShardedBucketSampler(src, tgt, 32, seed=1, bucket_batches=50)
    batches = sampler.epoch_batches(0)
    spread = np.mean([np.ptp([src[i] for i in b]) for b in batches])
    rng = np.random.default_rng(0)
    random_spread = np.mean([np.ptp(rng.choice(src, 32)) for _ in range(len(batches))])
    assert spread < random_spread / 4


def test_deterministic_for_a_seed_and_different_per_epoch() -> None:
    src, tgt = _lengths(500)
    a = ShardedBucketSampler(src, tgt, 8, seed=3).epoch_batches(0)
    b = ShardedBucketSampler(src, tgt, 8, seed=3).epoch_batches(0)
    c = ShardedBucketSampler(src, tgt, 8, seed=4).epoch_batches(0)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    assert [x.tolist() for x in a] != [x.tolist() for x in ShardedBucketSampler(src, tgt, 8, seed=3).epoch_batches(1)]


def test_resume_from_state_continues_identically() -> None:
    src, tgt = _lengths(300)
    full = ShardedBucketSampler(src, tgt, 8, rank=1, world=2, seed=9)
    reference = list(itertools.islice(iter(full), 40))  # crosses an epoch boundary (19 batches per epoch)
    first = ShardedBucketSampler(src, tgt, 8, rank=1, world=2, seed=9)
    it = iter(first)
    head = list(itertools.islice(it, 25))
    state = first.state_dict()
    resumed = ShardedBucketSampler(src, tgt, 8, rank=1, world=2, seed=9)
    resumed.load_state_dict(state)
    assert head + list(itertools.islice(iter(resumed), 15)) == reference


def _union_of_steps(samplers: list[ShardedBucketSampler], steps: int) -> list[list[int]]:
    """The examples of each of the next ``steps`` steps, over all ranks' samplers, sorted."""
    per_rank = [list(itertools.islice(iter(s), steps)) for s in samplers]
    return [sorted(i for rank in per_rank for i in rank[step]) for step in range(steps)]


def test_a_state_continues_on_another_number_of_ranks_with_the_same_global_batches() -> None:
    src, tgt = _lengths(300)  # 2 ranks x 8 = a global batch of 16, 18 steps an epoch
    two = [ShardedBucketSampler(src, tgt, 8, rank=r, world=2, seed=9) for r in range(2)]
    for s in two:
        list(itertools.islice(iter(s), 12))
    state = two[0].state_dict()
    reference = _union_of_steps(two, 20)  # crosses the epoch's end
    for world in (1, 4):  # the micro-batch re-derived: 16 = 1 x 16 = 4 x 4
        resumed = [ShardedBucketSampler(src, tgt, 16 // world, rank=r, world=world, seed=9) for r in range(world)]
        for s in resumed:
            s.load_state_dict(state)
        assert _union_of_steps(resumed, 20) == reference, world
