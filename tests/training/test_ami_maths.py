"""The AMI phases' maths on tiny real networks, each test written to fail when the maths breaks:
the noise step's score term uses exactly its own draws, the K·B layout is sample-major, T̃ follows the
noise, ranks draw different noise and a resumed rank the same, the forward REINFORCE term scores T̃ with
the pass that chose it, and the bounded demotion stops past its margin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from ami_dist import ops
from ami_dist.ops import reference
from ami_dist.training.objectives import backward_adversarial_loss
from ami_dist.training.phases import forward_adversarial_objective, make_stream, noise_objective
from ami_dist.training.synthetic import NoiseStream, Synthetic, argmax_targets, noisy_memory, rewards
from tests.training.fake_run import fake_run

INDICES = [0, 1, 2, 3]


def test_noise_score_term_uses_exactly_the_draws_of_its_sample() -> None:
    run = fake_run(k=3, strength_term=False)
    seen: dict[str, torch.Tensor] = {}

    def mu_of(h: torch.Tensor) -> torch.Tensor:
        seen["h"], seen["mu"] = h, run.noise.module(h)
        return seen["mu"]

    offset = run.stream.offset  # where this step's draws start
    objective = noise_objective(run, INDICES, mu_of)
    (grad,) = torch.autograd.grad(objective.loss, seen["mu"])

    # The same draws, regenerated independently by the pure-PyTorch twin from the step's first offset:
    # −(1/KB) Σ_k A_k Σ_positions log N(δ_k; μ, softplus(μ)), differentiated by autograd with δ_k fixed.
    h, k, scale = seen["h"], run.cfg.lns.k, run.cfg.lns.scale
    mu = seen["mu"].detach().requires_grad_()
    h_noisy, _ = reference.lns_sample(h.contiguous(), mu.detach().contiguous(), k, scale, run.stream.seed, offset,
                                      mask=objective.mask)
    delta = ((h_noisy - h) / scale).detach()
    log_density = Normal(mu, F.softplus(mu)).log_prob(delta).sum(dim=-1)  # (K, B, S)
    per_sentence = (log_density * objective.mask).sum(dim=-1)
    expected_loss = -(objective.advantages * per_sentence).sum() / (k * len(INDICES))
    (expected,) = torch.autograd.grad(expected_loss, mu)
    assert grad.abs().sum() > 0 and objective.advantages.abs().sum() > 0
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_rewards_and_memory_banks_are_sample_major_with_k_and_b_above_two() -> None:
    run = fake_run(k=3, pairs=4)
    k, b, vocab = 3, 4, run.vocab
    bw = run.network("backward")
    model = bw.engine.module.eval()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, len(vocab), (k * b, 5), generator=gen)  # a distinct T̃ in every row
    lengths = torch.tensor([5, 4, 3, 2, 1, 5, 4, 3, 2, 1, 5, 4])
    tokens[torch.arange(5)[None, :] >= lengths[:, None]] = vocab.pad_id
    syn = Synthetic(tokens, lengths)
    real = bw.batch(INDICES, vocab)  # its decoder side is the real source S
    together = rewards(model, syn, real.tgt_in, real.tgt_out, k, vocab.pad_id, vocab.eos_id)
    for i in range(k * b):  # row k·B + b is sample k of sentence b
        one = Synthetic(tokens[i : i + 1], lengths[i : i + 1])
        s = i % b
        alone = rewards(model, one, real.tgt_in[s : s + 1], real.tgt_out[s : s + 1], 1, vocab.pad_id, vocab.eos_id)
        assert together[i // b, s].item() == pytest.approx(alone.item(), rel=1e-5), i

    enc = model.encode(real.src, real.src_lengths)
    h_noisy = torch.randn(k, *enc.memory.shape, generator=gen)
    batched = model.perturbed(enc, h_noisy)
    for i in range(k * b):
        torch.testing.assert_close(batched.memory[i], h_noisy[i // b, i % b])
        torch.testing.assert_close(batched.mask[i], enc.mask[i % b])


def test_synthetic_targets_follow_the_noise() -> None:
    run = fake_run(k=4, pairs=6)
    k, vocab = 4, run.vocab
    fw = run.network("forward")
    model = fw.engine.module.eval()
    batch = fw.batch(list(range(6)), vocab)
    with torch.no_grad():
        enc = model.encode(batch.src, batch.src_lengths)
        mu = torch.zeros_like(enc.memory)

        def synthetic(seed: int) -> tuple[Synthetic, object]:
            enc_k, _, _ = noisy_memory(model, enc, mu, k, 1.0, NoiseStream(seed))
            return argmax_targets(model, enc_k, batch.tgt_in, batch.tgt_out, vocab.pad_id, vocab.bos_id,
                                  vocab.eos_id), enc_k

        syn, enc_k = synthetic(5)
        other, _ = synthetic(6)
        assert not torch.equal(syn.tokens, other.tokens)  # other noise, other T̃
        assert (syn.distinct_per_sentence(k) > 1).any()  # the K samples of a sentence differ
        for i in range(k * 6):  # each row is the greedy pick over that row's own noisy memory
            s = i % 6
            logits = model.generator(model.decode(batch.tgt_in[s : s + 1], enc_k.select(torch.tensor([i])))[0])[0]
            logits[:, [vocab.pad_id, vocab.bos_id]] = float("-inf")
            gold = int((batch.tgt_out[s] != vocab.pad_id).sum())
            pred = logits[:gold].argmax(dim=-1).tolist()
            expected = pred[: pred.index(vocab.eos_id)] if vocab.eos_id in pred else pred
            assert syn.tokens[i, : syn.lengths[i]].tolist() == expected, i


def test_ranks_draw_different_noise_and_a_resumed_rank_the_same() -> None:
    torch.manual_seed(0)
    h, mu = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    def draw(stream: NoiseStream) -> torch.Tensor:
        return ops.lns_sample(h, mu, 3, 1.0, stream.seed, stream.take(3, mu.numel()))[0]

    rank0, rank1 = make_stream(1234, 0), make_stream(1234, 1)
    assert not torch.allclose(draw(rank0), draw(rank1))
    saved = rank0.offset  # what a checkpoint keeps of the stream
    following = draw(rank0)
    resumed = make_stream(1234, 0)
    resumed.offset = saved
    torch.testing.assert_close(draw(resumed), following, rtol=0, atol=0)
    assert not torch.allclose(draw(rank0), following)  # and the stream moves on


def test_forward_reinforce_scores_tbar_with_the_pass_that_chose_it() -> None:
    run = fake_run(k=3, pairs=4, dropout=0.3)  # dropout on in training: the pass picking T̃ runs without it
    k, vocab = 3, run.vocab
    fw = run.network("forward")
    offset = run.stream.offset
    objective = forward_adversarial_objective(run, INDICES)
    assert fw.engine.module.training  # back in training mode afterwards

    model = fw.engine.module
    batch = fw.batch(INDICES, vocab)
    model.eval()
    with torch.no_grad():
        enc = model.encode(batch.src, batch.src_lengths)
        mu = run.noise.module(enc.memory)
        h_noisy, _ = reference.lns_sample(enc.memory.contiguous(), mu.contiguous(), k, run.cfg.lns.scale,
                                          run.stream.seed, offset, mask=enc.mask)
        log_p = torch.log_softmax(model.generator(model.decode(batch.tgt_in.repeat(k, 1),
                                                               model.perturbed(enc, h_noisy))[0]), dim=-1)
    syn = objective.picks.synthetic
    gold = (batch.tgt_out != vocab.pad_id).sum(dim=1).repeat(k)
    expected = []
    for i in range(k * len(INDICES)):
        length = int(syn.lengths[i])
        scored = syn.tokens[i, :length].tolist() + ([vocab.eos_id] if length < gold[i] else [])
        expected.append(-sum(log_p[i, t, token] for t, token in enumerate(scored)) / len(scored))
        # T̃ is this pass's own argmax: it was not decoded again with itself as the prefix
        best = log_p[i, :length].clone()
        best[:, [vocab.pad_id, vocab.bos_id]] = float("-inf")
        assert best.argmax(dim=-1).tolist() == syn.tokens[i, :length].tolist()
    torch.testing.assert_close(objective.nll.detach().flatten(), torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert objective.nll.requires_grad  # the REINFORCE gradient flows through those same logits


def test_bounded_demotion_stops_past_its_margin() -> None:
    real = torch.tensor([2.0, 2.0], requires_grad=True)
    synthetic = torch.tensor([[2.5, 3.5]], requires_grad=True)  # sentence 0 inside the margin, 1 past it
    weights = torch.tensor([[0.5, 0.5]])
    backward_adversarial_loss(real, synthetic, weights, margin=1.0).backward()
    assert synthetic.grad.tolist() == [[-0.25, 0.0]]
    assert real.grad.tolist() == [0.5, 0.5]  # the margin's reference is a constant: only the MLE term
    synthetic.grad = None
    backward_adversarial_loss(real, synthetic, weights).backward()  # the release's form never stops
    assert synthetic.grad.tolist() == [[-0.25, -0.25]]
