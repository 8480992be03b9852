"""The alternating schedule's positions, and synthetic targets / rewards built tensor-wide."""

from __future__ import annotations

import pytest
import torch

from ami_dist.models import ModelConfig, build_model
from ami_dist.training.losses import sentence_nll
from ami_dist.training.schedule import Phase, Schedule, Stage
from ami_dist.training.synthetic import NoiseStream, Synthetic, argmax_targets, noisy_memory, pick, rewards

V, PAD, BOS, EOS = 20, 0, 2, 3


def test_schedule_positions() -> None:
    s = Schedule(pretrain_steps=3, noise_pretrain_steps=2, noise_steps=4, forward_steps=8, backward_steps=8,
                 cycles=2)
    assert s.total_steps == 3 + 2 + 2 * 20 and s.adversarial_start == 5
    assert s.position(0) == (Phase.MLE, 0, -1) and s.position(2) == (Phase.MLE, 2, -1)
    assert s.position(3) == (Phase.NOISE, 0, -1) and s.position(4) == (Phase.NOISE, 1, -1)
    assert [s.position(i).stage for i in (2, 3, 4, 5)] == [Stage.MLE, Stage.NOISE_PRETRAIN, Stage.NOISE_PRETRAIN,
                                                           Stage.ADVERSARIAL]
    assert s.position(5) == (Phase.NOISE, 0, 0)
    assert s.position(9) == (Phase.FORWARD, 0, 0)
    assert s.position(16) == (Phase.FORWARD, 7, 0)
    assert s.position(17) == (Phase.BACKWARD, 0, 0)
    assert s.position(24) == (Phase.BACKWARD, 7, 0)
    assert s.position(25) == (Phase.NOISE, 0, 1)
    assert s.position(44) == (Phase.BACKWARD, 7, 1) and s.position(44).stage is Stage.ADVERSARIAL
    with pytest.raises(ValueError):
        s.position(45)
    # phases and stages of length zero are skipped
    assert Schedule(0, 0, 0, 2, 1, 1).position(2) == (Phase.BACKWARD, 0, 0)
    assert Schedule(1, 0, 1, 1, 1, 1).position(1) == (Phase.NOISE, 0, 0)
    assert [int(p) for p in Phase] == [-1, 0, 1, 2]  # the logged schedule/phase values
    assert [int(p) for p in Stage] == [0, 1, 2]  # schedule/stage


def test_noise_stream_advances_past_each_draw() -> None:
    stream = NoiseStream(seed=9)
    assert stream.take(5, 10) == 0
    assert stream.take(5, 10) == 52  # 50 draws rounded up to a multiple of 4
    assert stream.offset == 104


def test_synthetic_as_source() -> None:
    syn = Synthetic(torch.tensor([[7, 8, PAD], [PAD, PAD, PAD], [9, PAD, PAD]]), torch.tensor([2, 0, 1]))
    src, lengths = syn.as_source(EOS)
    assert src.tolist() == [[7, 8, PAD], [EOS, PAD, PAD], [9, PAD, PAD]]
    assert lengths.tolist() == [2, 1, 1]


def test_pick_cuts_at_the_first_eos_and_scores_it() -> None:
    inside = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    best = [[10, EOS, 11, 12], [13, 14], [PAD, BOS, EOS]]  # row 2: PAD and BOS are never chosen
    logits = torch.zeros(int(inside.sum()), V)
    row = 0
    for tokens in best:
        for token in tokens:
            logits[row, token] = 5.0
            logits[row, 15] = 4.0  # the runner-up, chosen where PAD or BOS is best
            row += 1
    picks = pick(logits, inside, PAD, BOS, EOS)
    assert picks.synthetic.tokens.tolist() == [[10, PAD, PAD, PAD], [13, 14, PAD, PAD], [15, 15, PAD, PAD]]
    assert picks.synthetic.lengths.tolist() == [1, 2, 2]
    # scored: T̃ and the first EOS where it falls inside the gold length; nothing after it
    assert picks.targets.tolist() == [10, EOS, PAD, PAD, 13, 14, 15, 15, EOS]
    nll = picks.nll(logits.requires_grad_(), PAD)
    log_p = torch.log_softmax(logits.detach(), dim=-1)
    expected = torch.stack([-(log_p[0, 10] + log_p[1, EOS]) / 2, -(log_p[4, 13] + log_p[5, 14]) / 2,
                            -(log_p[6, 15] + log_p[7, 15] + log_p[8, EOS]) / 3])
    torch.testing.assert_close(nll.detach(), expected)
    nll.sum().backward()  # the scores carry the gradient into the logits that chose T̃
    assert logits.grad[2:4].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_distinct_samples_per_sentence_are_counted_sample_major() -> None:
    k, b = 3, 3  # sentence 0: all three samples equal; 1: two equal, one different; 2: all different
    rows = {(0, 0): [5, 6], (1, 0): [5, 6], (2, 0): [5, 6],
            (0, 1): [7, 8], (1, 1): [7, PAD], (2, 1): [7, 8],
            (0, 2): [9, PAD], (1, 2): [10, PAD], (2, 2): [9, 11]}
    tokens = torch.tensor([rows[(i // b, i % b)] for i in range(k * b)])
    syn = Synthetic(tokens, (tokens != PAD).sum(dim=1))
    assert syn.distinct_per_sentence(k).tolist() == [1, 2, 3]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(emb_dim=8, hidden_size=8, enc_layers=1, dec_layers=1, dropout=0.0, input_feed=True)
    return build_model(cfg, V, PAD).eval()


def test_argmax_targets_cut_at_first_eos_and_gold_length() -> None:
    model = _model()
    src = torch.tensor([[5, 6, 7], [8, 9, PAD]])
    enc = model.encode(src, torch.tensor([3, 2]))
    gold_in = torch.tensor([[BOS, 10, 11, 12], [BOS, 13, PAD, PAD]])
    gold_out = torch.tensor([[10, 11, 12, EOS], [13, EOS, PAD, PAD]])
    with torch.no_grad():
        model.generator.bias.fill_(0.0)
        model.generator.bias[14] = 50.0  # always predict 14 ...
        model.generator.bias[PAD] = 100.0  # ... except that padding and BOS are never predicted
        model.generator.bias[BOS] = 100.0
    enc_k, _, _ = noisy_memory(model, enc, torch.zeros_like(enc.memory), 2, 0.1, NoiseStream(1))
    syn = argmax_targets(model, enc_k, gold_in, gold_out, PAD, BOS, EOS)
    # K=2 copies (sample-major); the second sentence's gold has 2 positions
    assert syn.tokens.tolist() == [[14, 14, 14, 14], [14, 14, PAD, PAD]] * 2
    assert syn.lengths.tolist() == [4, 2, 4, 2]
    with torch.no_grad():
        model.generator.bias[EOS] = 200.0  # now EOS first: empty synthetic targets
    syn = argmax_targets(model, enc_k, gold_in, gold_out, PAD, BOS, EOS)
    assert syn.lengths.tolist() == [0, 0, 0, 0]
    assert torch.all(syn.tokens == PAD)


def test_rewards_are_length_normalised_logq_per_sample() -> None:
    backward = _model()
    syn = Synthetic(torch.tensor([[7, 8], [9, PAD], [10, 11], [PAD, PAD]]), torch.tensor([2, 1, 2, 0]))
    src_in = torch.tensor([[BOS, 5, 6], [BOS, 4, PAD]])
    src_out = torch.tensor([[5, 6, EOS], [4, EOS, PAD]])
    r = rewards(backward, syn, src_in, src_out, k=2, pad_id=PAD, eos_id=EOS)
    assert r.shape == (2, 2)
    # sample k=1 of sentence 1 is T̃ = [] (read as [EOS]) scored against S = [4]
    with torch.no_grad():
        logits = backward(torch.tensor([[EOS]]), torch.tensor([1]), src_in[1:])
        expected = -sentence_nll(logits, src_out[1:], PAD, length_normalise=True)
    assert r[1, 1].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.all(r < 0)
