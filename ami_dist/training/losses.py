"""Token- and sentence-level negative log-likelihoods (padding ignored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, target: torch.Tensor, pad_id: int,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (optionally label-smoothed) NLL over non-pad target tokens, and the number of those tokens."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=pad_id,
                           reduction="sum", label_smoothing=label_smoothing)
    return loss, (target != pad_id).sum()


def sentence_nll(logits: torch.Tensor, target: torch.Tensor, pad_id: int,
                 length_normalise: bool = False) -> torch.Tensor:
    """NLL of each sentence (B,), optionally divided by its number of target tokens."""
    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=pad_id, reduction="none").sum(dim=1)
    if length_normalise:
        nll = nll / (target != pad_id).sum(dim=1).clamp(min=1)
    return nll


def positions_nll(logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor, pad_id: int,
                  length_normalise: bool = True) -> torch.Tensor:
    """NLL of each row (N,) from the logits (P, vocab) of the P positions ``positions`` (N, T) picks, row-major.

    ``targets`` (P,) is the token scored at each of those positions, ``pad_id`` where none is; with
    ``length_normalise`` each row's sum is divided by its number of scored tokens.
    """
    per_position = F.cross_entropy(logits, targets, ignore_index=pad_id, reduction="none")
    total = logits.new_zeros(positions.shape).masked_scatter(positions, per_position).sum(dim=1)
    if not length_normalise:
        return total
    counts = torch.zeros_like(positions, dtype=torch.long).masked_scatter(positions, (targets != pad_id).long())
    return total / counts.sum(dim=1).clamp(min=1)
