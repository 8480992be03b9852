"""The seq2seq families (LSTM and Transformer): padding invariance, incremental decoding equal to teacher
forcing, weight sharing, K noisy memory banks as one batch, greedy decoding."""

from __future__ import annotations

import pytest
import torch

from ami_dist.decoding.greedy import greedy_decode
from ami_dist.models import ModelConfig, build_model

V, PAD, BOS, EOS = 30, 0, 2, 3


TRANSFORMER = {"family": "transformer", "emb_dim": 16, "hidden_size": 16, "heads": 2, "ffn_size": 32,
               "dec_layers": 3}
# Each variant a test runs over: the LSTM with and without input feeding / a bidirectional encoder,
# and the Transformer with post- and pre-norm.
VARIANTS = {
    "lstm": {},
    "lstm-bi-feed": {"bidirectional": True, "input_feed": True},
    "lstm-bi-nofeed": {"bidirectional": True, "input_feed": False},
    "transformer-post": TRANSFORMER,
    "transformer-pre": {**TRANSFORMER, "norm": "pre"},
}


def _model(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"emb_dim": 12, "hidden_size": 16, "enc_layers": 2, "dec_layers": 2, "dropout": 0.0,
                         **overrides})
    return build_model(cfg, V, PAD).eval()


def _src() -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.tensor([[5, 6, 7, 8], [9, 10, PAD, PAD]])
    return src, torch.tensor([4, 2])


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_and_batch_mates_do_not_change_a_sentence(variant: str) -> None:
    model = _model(**VARIANTS[variant])
    src, lengths = _src()
    tgt = torch.tensor([[BOS, 11, 12], [BOS, 13, 14]])
    with torch.no_grad():
        together = model(src, lengths, tgt)
        alone = model(src[1:, :2], lengths[1:], tgt[1:])
    assert together.shape == (2, 3, V)
    torch.testing.assert_close(together[1], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_by_step_decoding_equals_teacher_forcing(variant: str) -> None:
    model = _model(**VARIANTS[variant])
    src, lengths = _src()
    tgt = torch.tensor([[BOS, 11, 12, 13], [BOS, 14, 15, 16]])
    with torch.no_grad():
        full = model(src, lengths, tgt)
        enc = model.encode(src, lengths)
        state, steps = None, []
        for t in range(tgt.size(1)):
            out, state = model.decode(tgt[:, t : t + 1], enc, state)
            steps.append(model.generator(out))
        # a two-token chunk after a prefix works too (beam search and greedy step one token at a time)
        _, prefix_state = model.decode(tgt[:, :2], enc)
        chunk, _ = model.decode(tgt[:, 2:], enc, prefix_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.generator(chunk), full[:, 2:], rtol=1e-5, atol=1e-5)


def test_decoder_state_select_reorders_rows() -> None:
    for variant in ("lstm-bi-feed", "transformer-pre"):
        model = _model(**VARIANTS[variant])
        src, lengths = _src()
        tgt = torch.tensor([[BOS, 11], [BOS, 14]])
        with torch.no_grad():
            enc = model.encode(src, lengths)
            _, state = model.decode(tgt, enc)
            swap = torch.tensor([1, 0])
            nxt = torch.tensor([[12], [15]])
            swapped, _ = model.decode(nxt[swap], enc.select(swap), state.select(swap))
            straight, _ = model.decode(nxt, enc, state)
        torch.testing.assert_close(swapped, straight[swap], rtol=1e-5, atol=1e-6)


def test_input_feeding_changes_the_model() -> None:
    src, lengths = _src()
    tgt = torch.tensor([[BOS, 11, 12], [BOS, 13, 14]])
    with torch.no_grad():
        a = _model(input_feed=True)(src, lengths, tgt)
        b = _model(input_feed=False)(src, lengths, tgt)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_weight_sharing_options() -> None:
    model = _model(share_embeddings=True, tie_generator=True, emb_dim=16)
    assert model.src_emb.weight is model.tgt_emb.weight is model.generator.weight
    separate = _model()
    assert separate.src_emb.weight is not separate.tgt_emb.weight
    names = {n for n, _ in model.named_parameters()}
    assert "generator.weight" not in names or "src_emb.weight" not in names  # counted once


def test_greedy_output_is_the_argmax_of_its_own_teacher_forcing() -> None:
    model = _model(input_feed=True)
    src, lengths = _src()
    out = greedy_decode(model, src, lengths, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=6)
    for row, ids in enumerate(out):
        assert len(ids) <= 6 and EOS not in ids
        tgt = torch.tensor([[BOS, *ids]])
        with torch.no_grad():
            logits = model(src[row : row + 1, : int(lengths[row])], lengths[row : row + 1], tgt)
        predicted = logits.argmax(-1)[0].tolist()
        assert predicted[: len(ids)] == ids
        if len(ids) < 6:  # it stopped because EOS was the argmax
            assert predicted[len(ids)] == EOS


def test_greedy_stops_at_eos_and_respects_max_len() -> None:
    model = _model()
    src, lengths = _src()
    with torch.no_grad():
        model.generator.bias.fill_(-100.0)
        model.generator.bias[EOS] = 100.0
    assert greedy_decode(model, src, lengths, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=5) == [[], []]
    with torch.no_grad():
        model.generator.bias[EOS] = -100.0
        model.generator.bias[7] = 100.0
    assert greedy_decode(model, src, lengths, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=4) == [[7] * 4, [7] * 4]


def test_greedy_keeps_stepping_until_every_rank_is_done() -> None:
    model = _model()
    src, lengths = _src()
    calls = []

    def others_need_three_more_steps(done: bool) -> bool:
        calls.append(done)
        return done and len(calls) > 4

    with torch.no_grad():
        model.generator.bias.fill_(-100.0)
        model.generator.bias[EOS] = 100.0
    assert greedy_decode(model, src, lengths, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=10,
                         all_done=others_need_three_more_steps) == [[], []]
    assert len(calls) == 5  # kept calling the decoder after finishing locally


@pytest.mark.parametrize("variant", ["lstm-bi-feed", "transformer-post"])
def test_noisy_memory_banks_decode_as_one_batch_of_k_times_b(variant: str) -> None:
    from ami_dist.ops import lns_sample

    model = _model(**VARIANTS[variant])
    src, lengths = _src()
    tgt = torch.tensor([[BOS, 11, 12], [BOS, 13, 14]])
    k = 3
    with torch.no_grad():
        enc = model.encode(src, lengths)
        mu = torch.randn_like(enc.memory)
        h_noisy, _ = lns_sample(enc.memory.contiguous(), mu, k, 0.1, seed=5, offset=0, mask=enc.mask)
        assert h_noisy.shape == (k, *enc.memory.shape)
        batched = model.perturbed(enc, h_noisy)
        assert batched.memory.shape[0] == k * 2
        together = model.generator(model.decode(tgt.repeat(k, 1), batched)[0])
        assert not torch.allclose(together[:2], together[2:4])  # different noise, different outputs
        for i in range(k):  # the reference: one sample at a time
            alone = model.perturbed(enc, h_noisy[i : i + 1])
            logits = model.generator(model.decode(tgt, alone)[0])
            torch.testing.assert_close(together[i * 2 : (i + 1) * 2], logits, rtol=1e-5, atol=1e-6)
        # padding keeps the clean states: the perturbation is masked
        torch.testing.assert_close(h_noisy[:, 1, 2:], enc.memory[1, 2:].expand(k, -1, -1))
        # no noise (λ = 0) reproduces the clean teacher-forced logits for every sample
        clean, _ = lns_sample(enc.memory.contiguous(), mu, k, 0.0, seed=5, offset=0, mask=enc.mask)
        quiet = model.generator(model.decode(tgt.repeat(k, 1), model.perturbed(enc, clean))[0])
        torch.testing.assert_close(quiet, model(src, lengths, tgt).repeat(k, 1, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_at_chosen_positions_are_those_of_the_full_output(variant: str) -> None:
    model = _model(**VARIANTS[variant])
    src, lengths = _src()
    tgt = torch.tensor([[BOS, 11, 12, 13], [BOS, 14, PAD, PAD]])
    real = tgt != PAD
    with torch.no_grad():
        full = model(src, lengths, tgt)
        chosen = model(src, lengths, tgt, positions=real)
    assert chosen.shape == (int(real.sum()), V)
    torch.testing.assert_close(chosen, full[real])


def test_input_feeding_cells_compute_what_the_fused_lstm_computes() -> None:
    """The input-feeding loop runs the decoder LSTM's weights one cell at a time (faster on CPU): outputs,
    final state and gradients equal stepping the fused nn.LSTM itself, dropout between layers included."""
    model = _model(input_feed=True, dropout=0.3).train()
    decoder = model.decoder
    src, lengths = _src()
    enc = model.encode(src, lengths)
    emb = torch.randn(2, 5, 12, requires_grad=True)

    def fused() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        feed, state, outs = emb.new_zeros(2, 16), enc.state, []
        for t in range(emb.size(1)):
            out, state = decoder.rnn(torch.cat([emb[:, t], feed], dim=-1).unsqueeze(1), state)
            feed = decoder.dropout(decoder.attn(out, enc.memory, enc.keys, enc.mask)).squeeze(1)
            outs.append(feed)
        return torch.stack(outs, dim=1), state

    torch.manual_seed(3)
    cells, (h, c), _ = decoder(emb, enc.memory, enc.keys, enc.mask, enc.state)
    torch.manual_seed(3)  # the same dropout masks, drawn in the same order
    reference, (h_ref, c_ref) = fused()
    torch.testing.assert_close(cells, reference)
    torch.testing.assert_close((h, c), (h_ref, c_ref))
    weights = [emb, decoder.rnn.weight_ih_l0, decoder.rnn.weight_hh_l1, decoder.rnn.bias_ih_l1]
    torch.testing.assert_close(torch.autograd.grad(cells.square().sum(), weights),
                               torch.autograd.grad(reference.square().sum(), weights))
