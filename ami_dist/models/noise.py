"""The noise network N_ψ of latent noise sampling: μ = Linear-ReLU-Linear(h), σ = softplus(μ) (in the op)."""

from __future__ import annotations

import torch
from torch import nn


class NoiseNetwork(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, inner_size), nn.ReLU(), nn.Linear(inner_size, hidden_size))

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        """μ for every encoder state: (..., H) -> (..., H)."""
        return self.net(memory)
