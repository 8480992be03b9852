"""The AMI objectives (Pan et al. 2020; DESIGN §2) as small functions of tensors.

Shapes: K samples, B sentences. Synthetic targets T̃_k come from the forward network over K noisy
memory banks; rewards R_k are length-normalised log q_φ(S | T̃_k) from the backward network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def advantages(rewards: torch.Tensor, baseline: bool) -> torch.Tensor:
    """R_k − b with b the mean of R over the K samples of each sentence (or R_k itself). (K, B)."""
    return rewards - rewards.mean(dim=0, keepdim=True) if baseline else rewards


def forward_adversarial_loss(synthetic_nll: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """REINFORCE for the forward network: mean_k,b [ A_k · NLL_θ(T̃_k | S, h̃_k) ] = −E[A · log p(T̃)].

    ``synthetic_nll`` (K, B) carries the gradient; ``adv`` (K, B) is a constant. A sample with a higher
    reward than its siblings gets its probability raised, a lower one lowered.
    """
    return (adv.detach() * synthetic_nll).mean()


def mean_embeddings(embedded: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """ē: the mean word embedding of each sentence, (N, L, D) embeddings of ids (N, L) -> (N, D), padding excluded."""
    mask = (ids != pad_id).unsqueeze(-1).to(embedded.dtype)
    return (embedded * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def demotion_weights(real: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
    """w_k = 1 − cos(ē(T), ē(T̃_k)) per sentence: real (B, D), synthetic (K, B, D) -> (K, B).

    A synthetic target equal to the real one gets weight 0: it is not demoted.
    """
    return 1.0 - F.cosine_similarity(synthetic, real.unsqueeze(0).expand_as(synthetic), dim=-1)


def backward_adversarial_loss(real_nll: torch.Tensor, synthetic_nll: torch.Tensor, weights: torch.Tensor,
                              margin: float | None = None) -> torch.Tensor:
    """L_bw = mean_b NLL_φ(S | T) − mean_k,b [ w_k · D_k ], the demotion D_k of synthetic pair k.

    Unbounded (``margin`` None, the release's form): D_k = NLL_φ(S | T̃_k), so raising a synthetic pair's NLL
    always pays, however far it already is above the real pair's; over long backward phases that can wreck
    the critic whose log q rewards the forward network. Bounded: D_k = min(NLL_φ(S | T̃_k), NLL_φ(S | T) + m)
    with the real pair's NLL a constant, so a synthetic pair is pushed down only until it is ``margin`` nats
    per token (for length-normalised NLLs) below the real one, and its gradient vanishes past that.
    Each synthetic pair is weighted by its own w_k (shape (K, B), no broadcasting across sentences).
    """
    if weights.shape != synthetic_nll.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match synthetic_nll {tuple(synthetic_nll.shape)}")
    demoted = synthetic_nll
    if margin is not None:
        demoted = torch.minimum(synthetic_nll, real_nll.detach().unsqueeze(0) + margin)
    return real_nll.mean() - (weights.detach() * demoted).mean()


def strength_loss(strength: torch.Tensor, mask: torch.Tensor, weight: float, cap: float) -> torch.Tensor:
    """−β · mean over real positions of min(‖δ‖, cap): pushes the noise up to the cap and no further.

    ``strength`` (K, ...) from the LNS op (differentiable w.r.t. μ); ``mask`` (...) True at real tokens.
    """
    m = mask.unsqueeze(0).expand_as(strength).to(strength.dtype)
    return -weight * (strength.clamp(max=cap) * m).sum() / m.sum().clamp(min=1.0)


def score_surrogate(mu: torch.Tensor, score_grad: torch.Tensor, num_samples: int, num_sentences: int) -> torch.Tensor:
    """A scalar whose gradient w.r.t. μ is −Σ_k A_k ∂log N(δ_k; μ, σ)/∂μ / (K·B).

    ``score_grad`` is ``lns_score_grad(μ, A, ...)``, so minimising this follows the score-function
    estimate of −E[(R − b) · log p(δ | μ, σ)] (T̃ is discrete: no path-wise gradient reaches ψ).
    """
    return -(mu * score_grad.detach()).sum() / float(num_samples * num_sentences)
