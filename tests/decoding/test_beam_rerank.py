"""Beam search (beam 1 = greedy; finds what greedy misses; length penalty; n-best) and reranking."""

from __future__ import annotations

import math

import pytest
import torch

from ami_dist.decoding.beam import Hypothesis, beam_search, length_penalty
from ami_dist.decoding.greedy import greedy_decode
from ami_dist.decoding.rerank import Reranker, source_logq
from ami_dist.models import ModelConfig, build_model
from ami_dist.models.seq2seq import Seq2Seq
from ami_dist.training.losses import sentence_nll
from tests.decoding.table import BOS, EOS, PAD, A, B, TableModel

# Greedy takes A (0.6) then A (0.4) then must end: p(A A) = 0.6 * 0.4 * 1.0 = 0.24.
# The better sequence starts with the less likely B: p(B) = 0.4 * 0.9 = 0.36.
TABLE = {
    (): {A: 0.6, B: 0.4},
    (A,): {A: 0.4, B: 0.3, EOS: 0.3},
    (A, A): {EOS: 1.0},
    (A, B): {EOS: 1.0},
    (B,): {EOS: 0.9, A: 0.1},
    (B, A): {EOS: 1.0},
}
SRC, LEN = torch.tensor([[7]]), torch.tensor([1])


def _search(model: Seq2Seq, **kw: object) -> list[list[Hypothesis]]:
    args = {"beam_size": 2, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_len_a": 0.0, "max_len_b": 5}
    return beam_search(model, SRC, LEN, **{**args, **kw})


def test_beam_finds_the_sequence_greedy_misses() -> None:
    model = TableModel(TABLE)
    assert greedy_decode(model, SRC, LEN, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=5) == [[A, A]]
    best = _search(model, n_best=2)[0]
    assert best[0].tokens == [B]
    assert best[0].logprob == pytest.approx(math.log(0.36), rel=1e-5)
    assert best[1].tokens == [A, A]  # the runner-up, 0.24
    assert best[1].logprob == pytest.approx(math.log(0.24), rel=1e-5)


def test_beam_of_one_is_greedy_on_the_table() -> None:
    assert _search(TableModel(TABLE), beam_size=1)[0][0].tokens == [A, A]


def test_length_penalty_favours_longer_hypotheses() -> None:
    table = {(): {A: 0.5, EOS: 0.5}, (A,): {EOS: 0.9, A: 0.1}}
    plain = _search(TableModel(table), n_best=2)[0]
    assert plain[0].tokens == []  # log 0.5 > log 0.45
    penalised = _search(TableModel(table), n_best=2, alpha=2.0)[0]
    assert penalised[0].tokens == [A]  # log(0.45) / ((5 + 2) / 6)^2 > log(0.5) / 1
    assert penalised[0].score == pytest.approx(math.log(0.45) / length_penalty(2, 2.0))


def test_max_length_finishes_what_is_alive() -> None:
    table = {(): {A: 1.0}, (A,): {A: 1.0}, (A, A): {A: 1.0}}
    hyp = _search(TableModel(table), max_len_b=2, beam_size=1)[0][0]
    assert hyp.tokens == [A, A]


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_beam_of_one_equals_greedy_on_a_network(family: str) -> None:
    torch.manual_seed(3)
    extra = {"heads": 2, "ffn_size": 32} if family == "transformer" else {"input_feed": True}
    cfg = ModelConfig(family=family, emb_dim=16, hidden_size=16, enc_layers=1, dec_layers=1, dropout=0.0, **extra)
    model = build_model(cfg, 40, PAD).eval()
    src = torch.randint(4, 40, (6, 5))
    lengths = torch.tensor([5, 4, 3, 5, 2, 1])
    greedy = greedy_decode(model, src, lengths, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=12)
    beams = beam_search(model, src, lengths, beam_size=1, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=0.0,
                        max_len_b=12)
    assert [b[0].tokens for b in beams] == greedy
    wide = beam_search(model, src, lengths, beam_size=4, n_best=4, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                       max_len_a=0.0, max_len_b=12)
    for hyps, g in zip(wide, beams, strict=True):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert hyps[0].logprob >= g[0].logprob - 1e-5  # a wider beam never finds a worse best


@pytest.mark.parametrize(("family", "eos_weight"), [("lstm", 1.0), ("transformer", 3.0)])
def test_a_batch_searches_each_sentence_as_if_alone(family: str, eos_weight: float) -> None:
    # Sentences end at different steps (by their own length limits; the Transformer's, with its EOS weights
    # scaled up, also by EOS at varying steps) and leave the decoder batch as they end; what the others find
    # must not change.
    torch.manual_seed(5)
    extra = {"heads": 2, "ffn_size": 32} if family == "transformer" else {"input_feed": True}
    cfg = ModelConfig(family=family, emb_dim=16, hidden_size=16, enc_layers=1, dec_layers=1, dropout=0.0, **extra)
    model = build_model(cfg, 40, PAD).eval()
    with torch.no_grad():
        model.generator.weight[EOS] *= eos_weight
    lengths = torch.tensor([7, 6, 5, 5, 3, 2, 1, 4])
    src = torch.randint(4, 40, (len(lengths), 7)).masked_fill(torch.arange(7) >= lengths.unsqueeze(1), PAD)
    args = {"beam_size": 3, "n_best": 3, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_len_a": 1.0,
            "max_len_b": 2}
    together = beam_search(model, src, lengths, **args)
    alone = [beam_search(model, src[i : i + 1, : int(n)], lengths[i : i + 1], **args)[0]
             for i, n in enumerate(lengths)]
    steps = {len(h.tokens) for hyps in together for h in hyps}
    assert len(steps) >= 4, steps  # the hypotheses did end at many different steps
    for batched, single in zip(together, alone, strict=True):
        assert [h.tokens for h in batched] == [h.tokens for h in single]
        assert [h.logprob for h in batched] == pytest.approx([h.logprob for h in single], abs=1e-5)


def test_reranking_orders_by_the_formula() -> None:
    nbest = [Hypothesis([A], -1.0, -1.0), Hypothesis([A, B, A], -2.0, -2.0), Hypothesis([B, B], -1.5, -1.5)]
    logq = [-6.0, -1.0, -3.0]
    mmi = Reranker("mmi", alpha=0.5, gamma=0.1).rerank(nbest, logq)
    # -1 - 3 + 0.1 = -3.9 ; -2 - 0.5 + 0.3 = -2.2 ; -1.5 - 1.5 + 0.2 = -2.8
    assert [h.tokens for h in mmi] == [[A, B, A], [B, B], [A]]
    assert [h.score for h in mmi] == pytest.approx([-2.2, -2.8, -3.9])
    assert [h.tokens for h in Reranker("backward").rerank(nbest, logq)] == [[A, B, A], [B, B], [A]]
    no_backward = Reranker("mmi", alpha=0.0, gamma=0.0).rerank(nbest, logq)
    assert [h.tokens for h in no_backward] == [[A], [B, B], [A, B, A]]  # the forward order
    with pytest.raises(ValueError, match="unknown reranking method"):
        Reranker("bleu").rerank(nbest, logq)


def test_source_logq_scores_the_source_given_each_hypothesis() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(emb_dim=8, hidden_size=8, enc_layers=1, dec_layers=1, dropout=0.0)
    backward = build_model(cfg, 12, PAD).eval()
    source = [7, 8, 9]
    nbest = [Hypothesis([10, 11], 0.0, 0.0), Hypothesis([], 0.0, 0.0)]
    got = source_logq(backward, [h.tokens for h in nbest], [source] * 2, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with torch.no_grad():
        logits = backward(torch.tensor([[10, 11]]), torch.tensor([2]), torch.tensor([[BOS, 7, 8, 9]]))
        expected = -sentence_nll(logits, torch.tensor([[7, 8, 9, EOS]]), PAD)
    assert got[0] == pytest.approx(float(expected), rel=1e-5)
    assert len(got) == 2 and got[1] < 0
