"""Token-budget batching: rank-batches sized by padded tokens, still sharded, deterministic and resumable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ami_dist.config import load_config
from ami_dist.data.batching import ShardedBucketSampler, padded_tokens, padding_fraction
from ami_dist.data.corpus import encode_split, read_split
from ami_dist.data.vocab import train_vocab
from tests.conftest import ROOT


def _lengths(n: int, seed: int = 0, high: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, high, n, dtype=np.int32), rng.integers(1, high, n, dtype=np.int32)


def _width(src: np.ndarray, tgt: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.maximum(src[rows], tgt[rows] + 1)


def _seen(samplers: list[ShardedBucketSampler], epoch: int = 0) -> list[int]:
    return [i for s in samplers for batch in s.epoch_batches(epoch) for i in batch.tolist()]


def test_padded_tokens_and_padding_fraction_count_bos_eos() -> None:
    assert padded_tokens([3, 5], [5, 2]) == 2 * 6  # the first target is 5 + EOS wide
    assert padded_tokens([7], [2]) == 7
    assert padded_tokens([], []) == 0
    # one batch of both examples: real 3 + 5 + 6 + 3 = 17, computed 2 * 5 + 2 * 6 = 22
    assert padding_fraction([[0, 1]], [3, 5], [5, 2]) == pytest.approx(1 - 17 / 22)
    assert padding_fraction([[0], [1]], [3, 5], [5, 2]) == 0.0  # alone, nothing is padded


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("budget", [60, 250, 2000])
def test_no_rank_batch_exceeds_the_budget_and_a_step_is_dealt_by_stride(world: int, budget: int) -> None:
    src, tgt = _lengths(3000, seed=world)
    samplers = [ShardedBucketSampler(src, tgt, 16, rank=r, world=world, seed=1, bucket_batches=5,
                                     batch_tokens=budget) for r in range(world)]
    steps = samplers[0].global_batches(0)
    shares = [s.epoch_batches(0) for s in samplers]
    assert all(len(share) == len(steps) for share in shares)  # lockstep: every rank has every step
    for j, step in enumerate(steps):
        assert len(step) >= world
        assert np.all(np.diff(_width(src, tgt, step)) >= 0)  # a step is a run of the width-sorted pool
        for r in range(world):
            assert shares[r][j].tolist() == step[r::world].tolist()
            assert padded_tokens(src[shares[r][j]], tgt[shares[r][j]]) <= budget


@pytest.mark.parametrize("world", [1, 2, 3])
def test_steps_take_as_many_examples_as_the_budget_allows(world: int) -> None:
    """The greedy cut: one more example of the sorted pool would push some rank past the budget."""
    src, tgt = _lengths(2000, seed=7)
    budget = 300
    sampler = ShardedBucketSampler(src, tgt, 16, world=world, seed=2, bucket_batches=10**6, batch_tokens=budget)
    steps = sampler.global_batches(0)  # one pool: the steps, put back in order, are the sorted corpus
    # (steps of one width: the full ones come first, the one cut short by a wider example last)
    key = [(w[0], w[-1], -len(w)) for w in (_width(src, tgt, s) for s in steps)]
    steps = [steps[i] for i in sorted(range(len(steps)), key=key.__getitem__)]
    assert sum(map(len, steps)) >= len(src) - (world - 1)
    for step, after in itertools.pairwise(steps):
        rows = -(-(len(step) + 1) // world)
        assert rows * int(_width(src, tgt, after[:1])[0]) > budget
    # and the budget is used: rank-batches carry about a budget of padded tokens each
    tokens = [padded_tokens(src[s[r::world]], tgt[s[r::world]]) for s in steps for r in range(world)]
    assert np.mean(tokens) > 0.9 * budget


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_example_once_per_epoch_and_at_most_world_minus_one_dropped(world: int) -> None:
    src, tgt = _lengths(2001, seed=world)
    for budget in (80, 700):
        samplers = [ShardedBucketSampler(src, tgt, 16, rank=r, world=world, seed=3, bucket_batches=4,
                                         batch_tokens=budget) for r in range(world)]
        for epoch in range(3):
            seen = _seen(samplers, epoch)
            assert len(seen) == len(set(seen))  # no example twice, on one rank or on two
            assert len(src) - len(seen) <= world - 1
            if world == 1:
                assert sorted(seen) == list(range(len(src)))


def test_an_epoch_remainder_joins_the_last_step_when_it_fits() -> None:
    """Widths 8 and 10, budget 100, mean width 9: pools of 2 x 11 examples, cut into steps of 20 and 2.

    441 examples leave 1 past the last full pool, fewer than the 2 ranks; it fits the last 2-example step.
    """
    width = np.array([8] * 220 + [10] * 221, dtype=np.int32)
    samplers = [ShardedBucketSampler(width, width - 1, 16, rank=r, world=2, seed=4, bucket_batches=1,
                                     batch_tokens=100) for r in range(2)]
    for epoch in range(3):
        assert sorted(_seen(samplers, epoch)) == list(range(441))


def test_an_epoch_remainder_that_does_not_fit_is_dropped() -> None:
    """Width 10, budget 100, 3 ranks: steps (and pools) of 30; 62 examples leave 2 that no step can take."""
    width = np.full(62, 10, dtype=np.int32)
    samplers = [ShardedBucketSampler(width, width - 1, 16, rank=r, world=3, seed=4, bucket_batches=1,
                                     batch_tokens=100) for r in range(3)]
    assert [len(s) for s in samplers[0].global_batches(0)] == [30, 30]
    seen = _seen(samplers)
    assert len(seen) == len(set(seen)) == 60


def test_deterministic_for_a_seed_and_different_per_seed_and_epoch() -> None:
    src, tgt = _lengths(1500)

    def layout(seed: int, epoch: int) -> list[list[int]]:
        sampler = ShardedBucketSampler(src, tgt, 8, world=2, seed=seed, bucket_batches=5, batch_tokens=400)
        return [s.tolist() for s in sampler.global_batches(epoch)]

    assert layout(3, 0) == layout(3, 0)
    assert layout(3, 0) != layout(4, 0)
    assert layout(3, 0) != layout(3, 1)
    sampler = ShardedBucketSampler(src, tgt, 8, world=2, seed=3, bucket_batches=5, batch_tokens=400)
    counts = [sampler.batches_per_epoch(e) for e in range(4)]
    assert counts == [len(sampler.epoch_batches(e)) for e in range(4)]
    assert sampler.batches_per_epoch() == counts[0]


def test_resume_from_state_continues_identically_on_every_rank() -> None:
    src, tgt = _lengths(600, seed=5)

    def sampler(rank: int) -> ShardedBucketSampler:
        return ShardedBucketSampler(src, tgt, 8, rank=rank, world=2, seed=9, bucket_batches=3, batch_tokens=300)

    per_epoch = sampler(0).batches_per_epoch()
    head_len, total = per_epoch // 2, per_epoch + per_epoch // 2 + 3  # resume mid-epoch, cross an epoch end
    for rank in range(2):
        reference = list(itertools.islice(iter(sampler(rank)), total))
        first = sampler(rank)
        head = list(itertools.islice(iter(first), head_len))
        resumed = sampler(rank)
        resumed.load_state_dict(first.state_dict())
        assert head + list(itertools.islice(iter(resumed), total - head_len)) == reference


def test_token_batched_steps_continue_on_fewer_ranks_and_refuse_more() -> None:
    from tests.data.test_vocab_batching import _union_of_steps

    src, tgt = _lengths(600, seed=5)

    def sampler(rank: int, world: int) -> ShardedBucketSampler:
        return ShardedBucketSampler(src, tgt, 8, rank=rank, world=world, seed=9, bucket_batches=3, batch_tokens=300)

    three = [sampler(r, 3) for r in range(3)]
    for s in three:
        list(itertools.islice(iter(s), 5))
    state = three[0].state_dict()
    reference = _union_of_steps(three, 2 * three[0].batches_per_epoch())
    for world in (1, 2):  # the steps laid out for 3 ranks, dealt to fewer (each takes more tokens)
        resumed = [sampler(r, world) for r in range(world)]
        for s in resumed:
            s.load_state_dict(state)
        assert _union_of_steps(resumed, len(reference)) == reference, world
    with pytest.raises(ValueError, match=r"laid out for the 3 ranks it started on.*at most 3 ranks, not 4"):
        sampler(0, 4).load_state_dict(state)


def test_a_budget_below_the_widest_example_is_refused() -> None:
    src, tgt = [10, 63, 5], [62, 3, 4]  # widths 63, 63, 5
    with pytest.raises(ValueError, match=r"train\.batch_tokens = 50 .* \(63 tokens.*at least 63"):
        ShardedBucketSampler(src, tgt, 8, batch_tokens=50)
    assert ShardedBucketSampler(src, tgt, 8, batch_tokens=63).batches_per_epoch() == 3  # 63 fits, 1 row a step


def test_a_state_with_another_budget_is_refused_and_old_states_are_sentence_batching() -> None:
    src, tgt = _lengths(200)
    tokens = ShardedBucketSampler(src, tgt, 8, seed=1, batch_tokens=500)
    state = tokens.state_dict()
    assert state["batch_tokens"] == 500
    with pytest.raises(ValueError, match=r"train\.batch_tokens = 500.*train\.batch_tokens = 600"):
        ShardedBucketSampler(src, tgt, 8, seed=1, batch_tokens=600).load_state_dict(state)
    with pytest.raises(ValueError, match=r"train\.batch_tokens = 500"):
        ShardedBucketSampler(src, tgt, 8, seed=1).load_state_dict(state)
    old = {"epoch": 2, "position": 3, "seed": 1, "world": 1}  # saved before token batching existed
    sentences = ShardedBucketSampler(src, tgt, 8, seed=1)
    sentences.load_state_dict(old)
    assert (sentences.epoch, sentences.position) == (2, 3)
    with pytest.raises(ValueError, match=r"train\.batch_tokens = 0"):
        tokens.load_state_dict(old)


def test_numpy_lengths_are_kept_compact_and_batch_like_lists() -> None:
    src, tgt = _lengths(500)
    as_lists = ShardedBucketSampler(src.tolist(), tgt.tolist(), 8, world=2, batch_tokens=300).global_batches(0)
    for dtype in (np.int32, np.uint16):
        sampler = ShardedBucketSampler(src.astype(dtype), tgt.astype(dtype), 8, world=2, batch_tokens=300)
        assert sampler.src_lengths.dtype == sampler.tgt_lengths.dtype == np.int32
        assert [s.tolist() for s in sampler.global_batches(0)] == [s.tolist() for s in as_lists]


@pytest.fixture(scope="module")
def demo_lengths() -> tuple[np.ndarray, np.ndarray, int]:
    """Token lengths of the NMT demo's training split, encoded as the trainer does, and its bucket size."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the demo config names its data relative to the repository
        cfg = load_config("configs/nmt_demo.yaml", [])
        pairs = read_split(cfg.data, "train")
    vocab = train_vocab(cfg.vocab.kind, [s for s, _ in pairs] + [t for _, t in pairs], cfg.vocab.size,
                        cfg.vocab.character_coverage)
    split, _ = encode_split(pairs, vocab, cfg.data.max_src_len, cfg.data.max_tgt_len)
    src = np.array([len(ids) for ids in split.src_ids], dtype=np.int32)
    tgt = np.array([len(ids) for ids in split.tgt_ids], dtype=np.int32)
    return src, tgt, cfg.train.bucket_batches


def test_token_batching_pads_less_than_sentence_batching_on_the_demo(
        demo_lengths: tuple[np.ndarray, np.ndarray, int]) -> None:
    src, tgt, bucket = demo_lengths
    tokens = ShardedBucketSampler(src, tgt, 32, seed=1, bucket_batches=bucket, batch_tokens=2048)
    sentences = ShardedBucketSampler(src, tgt, 32, seed=1, bucket_batches=bucket)
    token_padding = padding_fraction(tokens.epoch_batches(0), src, tgt)
    sentence_padding = padding_fraction(sentences.epoch_batches(0), src, tgt)
    print(f"padding: {token_padding:.4f} with 2048-token batches, {sentence_padding:.4f} with 32 sentences")
    assert token_padding <= 0.10
    assert token_padding < sentence_padding
