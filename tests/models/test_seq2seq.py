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


def _fused_reference(decoder, emb, enc, between, after):
    """The input-feeding decoder stepped through oneDNN's fused LSTM, one single-layer call per layer and
    token, with the given dropout masks (between layers (layers − 1, T, B, H), after attention (T, B, H))."""
    first = torch.nn.LSTM(decoder.rnn.input_size, decoder.hidden_size, batch_first=True)
    later = torch.nn.LSTM(decoder.hidden_size, decoder.hidden_size, batch_first=True)
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    h, c = (list(x.unbind(0)) for x in enc.state)
    feed, outs = emb.new_zeros(emb.size(0), decoder.hidden_size), []
    for t in range(emb.size(1)):
        x = torch.cat([emb[:, t], feed], dim=-1)
        for layer, params in enumerate(decoder.rnn.all_weights):
            if layer:
                x = x * between[layer - 1, t]
            named = dict(zip(names, params, strict=True))
            out, (h_l, c_l) = torch.func.functional_call(later if layer else first, named,
                                                         (x.unsqueeze(1), (h[layer][None], c[layer][None])))
            h[layer], c[layer], x = h_l[0], c_l[0], out[:, 0]
        feed = decoder.attn(x.unsqueeze(1), enc.memory, enc.keys, enc.mask).squeeze(1) * after[t]
        outs.append(feed)
    return torch.stack(outs, dim=1), (torch.stack(h), torch.stack(c))


def _input_feeding_setup(monkeypatch: pytest.MonkeyPatch, batch: int, steps: int):
    model = _model(input_feed=True, dropout=0.3, enc_layers=3, dec_layers=3).train()
    decoder = model.decoder
    src = torch.randint(4, V, (batch, 4))
    enc = model.encode(src, torch.full((batch,), 4))
    emb = torch.randn(batch, steps, 12, requires_grad=True)
    keep = torch.Generator().manual_seed(7)
    between = torch.bernoulli(torch.full((2, steps, batch, 16), 0.7), generator=keep) / 0.7
    after = torch.bernoulli(torch.full((steps, batch, 16), 0.7), generator=keep) / 0.7
    drawn = {}

    def masks(steps_: int, batch_: int, like: torch.Tensor):  # rows in the order the decoder runs them
        order = drawn["order"]
        return between[:, :steps_, order], after[:steps_, order]

    monkeypatch.setattr(decoder, "_dropout_masks", masks)
    drawn["order"] = torch.arange(batch)
    return model, decoder, enc, emb, between, after, drawn


def test_input_feeding_cells_compute_what_the_fused_lstm_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The input-feeding loop runs the decoder LSTM's weights one cell at a time with weight gradients
    summed over steps (faster on CPU): outputs, final state and every gradient equal stepping the fused
    nn.LSTM, dropout between layers and after attention included."""
    model, decoder, enc, emb, between, after, _ = _input_feeding_setup(monkeypatch, 3, 5)
    cells, (h, c), _ = decoder(emb, enc.memory, enc.keys, enc.mask, enc.state)
    reference, (h_ref, c_ref) = _fused_reference(decoder, emb, enc, between, after)
    torch.testing.assert_close(cells, reference)
    torch.testing.assert_close((h, c), (h_ref, c_ref))
    wrt = [emb, *decoder.parameters(), *model.encoder.parameters()]
    torch.manual_seed(0)
    weights = torch.randn_like(cells)
    loss, loss_ref = ((out * weights).sum() + hh.square().sum() + cc.sum()
                      for out, hh, cc in ((cells, h, c), (reference, h_ref, c_ref)))
    got = torch.autograd.grad(loss, wrt, retain_graph=True)
    for g, w in zip(got, torch.autograd.grad(loss_ref, wrt), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_input_feeding_skips_padding_after_each_rows_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """With row lengths, positions after a row's end are not computed (zeros), the returned state is the
    state after its last real token, and the real positions and all gradients equal the full computation."""
    model, decoder, enc, emb, between, after, drawn = _input_feeding_setup(monkeypatch, 4, 6)
    lengths = torch.tensor([3, 6, 1, 4])
    drawn["order"] = torch.argsort(lengths, descending=True, stable=True)
    out, (h, c), feed = decoder(emb, enc.memory, enc.keys, enc.mask, enc.state, lengths=lengths)
    drawn["order"] = torch.arange(4)
    full, _ = _fused_reference(decoder, emb, enc, between, after)
    real = torch.arange(6)[None] < lengths[:, None]
    torch.testing.assert_close(out[real], full[real])
    assert out[~real].abs().sum() == 0
    for row, n in enumerate(lengths.tolist()):
        one = type(enc)(enc.memory[row:row + 1], enc.mask[row:row + 1], enc.keys[row:row + 1],
                        tuple(x[:, row:row + 1] for x in enc.state))
        steps = [between[:, :n, row:row + 1], after[:n, row:row + 1]]
        alone, (h_alone, c_alone) = _fused_reference(decoder, emb[row:row + 1, :n], one, *steps)
        torch.testing.assert_close((h[:, row], c[:, row], feed[row]), (h_alone[:, 0], c_alone[:, 0], alone[0, -1]))
    wrt = [emb, *decoder.parameters(), *model.encoder.parameters()]
    torch.manual_seed(0)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out[real] * weights[real]).sum(), wrt, retain_graph=True)
    want = torch.autograd.grad((full[real] * weights[real]).sum(), wrt)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_input_feeding_dropout_masks_are_inverted_dropout() -> None:
    decoder = _model(input_feed=True, dropout=0.3, enc_layers=3, dec_layers=3).decoder.train()
    between, after = decoder._dropout_masks(50, 40, torch.empty(0))
    assert between.shape == (2, 50, 40, 16) and after.shape == (50, 40, 16)
    for mask in (between, after):
        assert mask.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
        assert abs(float((mask > 0).float().mean()) - 0.7) < 0.02
    assert not torch.equal(between[0], between[1])
    assert decoder.eval()._dropout_masks(50, 40, torch.empty(0)) == (None, None)


def test_input_feeding_gradients_when_later_steps_are_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss on the first steps only: the steps after them never run backward, and the gradients still
    equal the fused reference's (the embedding projection's rows of unused steps get zero gradient)."""
    _, decoder, enc, emb, between, after, _ = _input_feeding_setup(monkeypatch, 3, 5)
    cells, _, _ = decoder(emb, enc.memory, enc.keys, enc.mask, enc.state)
    reference, _ = _fused_reference(decoder, emb, enc, between, after)
    wrt = [emb, *decoder.parameters()]
    got = torch.autograd.grad(cells[:, :2].sum(), wrt, retain_graph=True)
    for g, w in zip(got, torch.autograd.grad(reference[:, :2].sum(), wrt), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert emb.grad is None and got[0][:, 2:].abs().sum() == 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_encoder_equals_the_packed_lstm(bidirectional: bool) -> None:
    """The encoder runs one fused call per distinct length instead of the packed-sequence LSTM: memory
    bank (zeros past each row's end), final state per layer (directions side by side) and gradients equal
    the packed nn.LSTM's."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    encoder = _model(bidirectional=bidirectional, enc_layers=3, dec_layers=3).encoder
    emb = torch.randn(5, 7, 12, requires_grad=True)
    lengths = torch.tensor([3, 7, 1, 7, 5])
    memory, (h, c) = encoder(emb, lengths)
    packed, (h_ref, c_ref) = encoder.rnn(pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False))
    memory_ref, _ = pad_packed_sequence(packed, batch_first=True, total_length=7)
    if bidirectional:  # (layers * 2, B, H/2) -> (layers, B, H)
        h_ref, c_ref = (x.view(3, 2, 5, 8).permute(0, 2, 1, 3).reshape(3, 5, 16) for x in (h_ref, c_ref))
    torch.testing.assert_close(memory, memory_ref)
    torch.testing.assert_close((h, c), (h_ref, c_ref))
    torch.manual_seed(0)
    weights = torch.randn_like(memory)
    wrt = [emb, *encoder.parameters()]
    got = torch.autograd.grad((memory * weights).sum() + h.sum() + c.square().sum(), wrt)
    want = torch.autograd.grad((memory_ref * weights).sum() + h_ref.sum() + c_ref.square().sum(), wrt)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["transformer-post", "transformer-pre"])
def test_transformer_decoder_skips_padding_after_each_rows_end(variant: str) -> None:
    """Teacher forcing on right-padded targets: the position-wise layers see only the live positions, and
    outputs and gradients at those positions are those of each row decoded alone."""
    model = _model(**VARIANTS[variant]).train()  # dropout is 0: train mode changes nothing else
    src, lengths = _src()
    tgt = torch.tensor([[BOS, 11, 12, 13, 14], [BOS, 15, PAD, PAD, PAD]])
    live = torch.tensor([[True] * 5, [True, True, False, False, False]])
    ffn_rows = []
    hook = model.dec_layers[0].ffn[0].register_forward_hook(lambda m, args, out: ffn_rows.append(args[0].shape[0]))
    together = model(src, lengths, tgt)
    hook.remove()
    assert ffn_rows == [int(live.sum())]  # 7 positions, not 10
    grads_together = torch.autograd.grad(together[live].square().sum(), list(model.parameters()), allow_unused=True)
    rows = [model(src[i : i + 1, : int(lengths[i])], lengths[i : i + 1], tgt[i : i + 1, : int(live[i].sum())])
            for i in range(2)]
    torch.testing.assert_close(together[live], torch.cat([r[0] for r in rows]), rtol=1e-5, atol=1e-5)
    grads_alone = torch.autograd.grad(sum(r.square().sum() for r in rows), list(model.parameters()),
                                      allow_unused=True)
    for name, a, b in zip((n for n, _ in model.named_parameters()), grads_together, grads_alone, strict=True):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
