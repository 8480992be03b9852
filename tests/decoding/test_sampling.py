"""Sampling (temperature, top-k, nucleus) against hand-worked distributions, its seeding, and the decoding
strategies ami-generate and ami-evaluate share (n-best lists and their scores, batched reranking)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ami_dist.data.vocab import WordVocab
from ami_dist.decoding.beam import beam_search, length_penalty
from ami_dist.decoding.greedy import greedy_decode
from ami_dist.decoding.rerank import Reranker, source_logq, target_logprob
from ami_dist.decoding.sampling import filter_logits, sample
from ami_dist.decoding.strategy import Strategy, decode_all, decode_batch
from ami_dist.models import ModelConfig, build_model
from tests.decoding.table import BOS, EOS, PAD, A, B, TableModel

# One step, then the end: the first token's distribution is all there is to sample.
TABLE = {(): {A: 0.5, B: 0.3, EOS: 0.2}, (A,): {EOS: 1.0}, (B,): {EOS: 1.0}}
DRAWS = 4000


def _frequencies(**kw: object) -> dict[tuple[int, ...], float]:
    (samples,) = sample(TableModel(TABLE), torch.tensor([[7]]), torch.tensor([1]), indices=[0], seed=11,
                        num_samples=DRAWS, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=0.0, max_len_b=5, **kw)
    counts = Counter(tuple(h.tokens) for h in samples)
    return {k: v / DRAWS for k, v in counts.items()}


def _close(got: dict[tuple[int, ...], float], expected: dict[tuple[int, ...], float]) -> None:
    assert set(got) == {k for k, p in expected.items() if p > 0}, (got, expected)
    for key, p in expected.items():
        sd = math.sqrt(p * (1 - p) / DRAWS)
        assert abs(got.get(key, 0.0) - p) <= 4 * sd + 1e-12, (key, got, expected)


def test_top_p_1_at_temperature_1_samples_the_models_own_distribution() -> None:
    _close(_frequencies(), {(A,): 0.5, (B,): 0.3, (): 0.2})


def test_the_nucleus_is_the_fewest_tokens_reaching_p() -> None:
    # sorted 0.5, 0.3, 0.2: the mass before B is 0.5 < 0.6, before EOS 0.8 >= 0.6, so the nucleus is {A, B}
    _close(_frequencies(top_p=0.6), {(A,): 0.5 / 0.8, (B,): 0.3 / 0.8, (): 0.0})
    _close(_frequencies(top_p=0.5), {(A,): 1.0, (B,): 0.0, (): 0.0})  # A alone reaches 0.5


def test_top_k_and_temperature_reshape_the_distribution() -> None:
    _close(_frequencies(top_k=2), {(A,): 0.5 / 0.8, (B,): 0.3 / 0.8, (): 0.0})
    # temperature 0.5 squares the probabilities before renormalising: 0.25, 0.09, 0.04
    _close(_frequencies(temperature=0.5), {(A,): 0.25 / 0.38, (B,): 0.09 / 0.38, (): 0.04 / 0.38})


def test_a_samples_logprob_is_the_models_whatever_it_was_drawn_from() -> None:
    (samples,) = sample(TableModel(TABLE), torch.tensor([[7]]), torch.tensor([1]), indices=[0], seed=3,
                        num_samples=50, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=0.0, max_len_b=5,
                        temperature=0.3, top_k=2)
    expected = {(A,): math.log(0.5), (B,): math.log(0.3)}
    assert {tuple(h.tokens) for h in samples} <= set(expected)
    for h in samples:
        assert h.logprob == pytest.approx(expected[tuple(h.tokens)], abs=1e-5)


def test_filter_logits_masks_exactly_outside_the_nucleus_and_checks_its_arguments() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    kept = filter_logits(logits, top_p=0.7).isfinite()
    assert kept.tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0.0)


def _network(family: str, seed: int = 3):
    torch.manual_seed(seed)
    extra = {"heads": 2, "ffn_size": 32} if family == "transformer" else {"input_feed": True}
    cfg = ModelConfig(family=family, emb_dim=16, hidden_size=16, enc_layers=1, dec_layers=1, dropout=0.0, **extra)
    return build_model(cfg, 40, PAD).eval()


SRC = torch.randint(4, 40, (6, 5), generator=torch.Generator().manual_seed(5))
LENGTHS = torch.tensor([5, 4, 3, 5, 2, 1])


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_sampling_with_top_k_1_is_greedy(family: str) -> None:
    model = _network(family)
    greedy = greedy_decode(model, SRC, LENGTHS, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=12)
    samples = sample(model, SRC, LENGTHS, indices=range(6), seed=1, num_samples=3, bos_id=BOS, eos_id=EOS,
                     pad_id=PAD, max_len_a=0.0, max_len_b=12, top_k=1, temperature=2.0)
    assert [[h.tokens for h in hyps] for hyps in samples] == [[g] * 3 for g in greedy]


def test_the_same_seed_gives_the_same_samples_however_the_input_is_batched() -> None:
    model = _network("lstm")

    def draw(rows: list[int], seed: int, n: int = 3) -> list[list[list[int]]]:
        found = sample(model, SRC[rows], LENGTHS[rows], indices=rows, seed=seed, num_samples=n, bos_id=BOS,
                       eos_id=EOS, pad_id=PAD, max_len_a=0.0, max_len_b=8)
        return [[h.tokens for h in hyps] for hyps in found]

    together = draw([0, 1, 2, 3, 4, 5], seed=9)
    assert draw([0, 1, 2, 3, 4, 5], seed=9) == together
    assert draw([4, 1], seed=9) == [together[4], together[1]]  # other batch-mates, other order
    assert [s[:2] for s in draw([0, 3], seed=9, n=2)] == [together[0][:2], together[3][:2]]  # fewer samples
    assert draw([0, 1, 2, 3, 4, 5], seed=10) != together
    assert len({tuple(map(tuple, s)) for s in together}) > 1  # the samples are not all alike


def test_an_n_best_list_is_sorted_and_scored_as_the_beam_scores_it() -> None:
    model = _network("lstm")
    with torch.no_grad():
        model.generator.bias[EOS] += 2.5  # most hypotheses end before the length limit
    strategy = Strategy("beam", beam=4, pool=4, length_penalty=1.0, max_len_a=0.0, max_len_b=10)
    vocab = WordVocab(["<pad>", "<unk>", "<s>", "</s>"])  # its ids are all decode_batch reads
    sources = [SRC[i, : LENGTHS[i]].tolist() for i in range(6)]
    found = decode_batch(strategy, model, None, sources, list(range(6)), vocab)
    direct = beam_search(model, SRC, LENGTHS, beam_size=4, n_best=4, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                         max_len_a=0.0, max_len_b=10, alpha=1.0)
    assert [[h.tokens for h in hyps] for hyps in found] == [[h.tokens for h in hyps] for hyps in direct]
    checked = 0
    for source, hyps in zip(sources, found, strict=True):
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        # the score is log p(T, EOS | S), teacher-forced independently, over the length penalty
        finished = [h for h in hyps if len(h.tokens) < 10]
        logp = target_logprob(model, [source] * len(finished), [h.tokens for h in finished], pad_id=PAD,
                              bos_id=BOS, eos_id=EOS)
        for h, lp in zip(finished, logp, strict=True):
            assert h.logprob == pytest.approx(lp, abs=1e-4)
            assert h.score == pytest.approx(lp / length_penalty(len(h.tokens) + 1, 1.0), abs=1e-4)
            checked += 1
    assert checked >= 12


def test_batched_reranking_equals_reranking_each_list_alone_and_greedy_is_scored() -> None:
    model, backward = _network("lstm", 3), _network("lstm", 4)
    vocab = WordVocab(["<pad>", "<unk>", "<s>", "</s>"])
    sources = [SRC[i, : LENGTHS[i]].tolist() for i in range(6)]
    reranker = Reranker("mmi", alpha=0.7, gamma=0.1)
    strategy = Strategy("beam", beam=3, pool=3, max_len_a=0.0, max_len_b=8, rerank=reranker)
    found = decode_all(strategy, model, backward, sources, vocab, batch_size=4)
    plain = decode_all(Strategy("beam", beam=3, pool=3, max_len_a=0.0, max_len_b=8), model, None, sources, vocab,
                       batch_size=4)
    for source, hyps, nbest in zip(sources, found, plain, strict=True):
        logq = source_logq(backward, [h.tokens for h in nbest], [source] * len(nbest), pad_id=PAD, bos_id=BOS,
                           eos_id=EOS)
        alone = reranker.rerank(nbest, logq)
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-5)
    greedy = decode_all(Strategy("greedy", max_len_a=0.0, max_len_b=8), model, None, [*sources, []], vocab, 4)
    assert greedy[-1][0].tokens == [] and math.isnan(greedy[-1][0].score)  # an empty source: nothing decoded
    assert [g[0].tokens for g in greedy[:-1]] == [p[0].tokens for p in decode_all(
        Strategy("beam", beam=1, pool=1, max_len_a=0.0, max_len_b=8), model, None, sources, vocab, 4)]
    logp = target_logprob(model, sources, [g[0].tokens for g in greedy[:-1]], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert [g[0].score for g in greedy[:-1]] == pytest.approx(logp)
