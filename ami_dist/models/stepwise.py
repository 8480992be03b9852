"""Autograd for a decoder that steps one token at a time: weight gradients once per call, not per step.

An input-feeding decoder must run its LSTM cells and attention output layer token by token. Left to
autograd, every step's backward computes its own weight gradient (a GEMM with only B rows of inner
dimension, writing the whole weight-sized result) and adds it into the accumulated gradient: on CPU that
costs more than the useful work. Here each step's backward only keeps the gradient of its
pre-activations, and one ``WeightGrads`` sink per call computes each weight's gradient as a single GEMM
over all steps (dW = Σ_t G_tᵀ X_t = [G_1; …; G_T]ᵀ [X_1; …; X_T]) after the last step's backward.

The sink's output, a scalar ``token``, is an input of every step, so the autograd engine runs the sink
only after all steps have run their backward. The steps read the real parameters in forward and
backward, exactly as ``torch.lstm_cell`` / ``F.linear`` would (so ZeRO-3's gathered parameters are
used the same way); only the weight gradients take another route. Gate order is PyTorch's (i, f, g, o).
"""

from __future__ import annotations

import itertools

import torch
from torch.autograd import Function


class WeightGrads:
    """Per weight, the (output gradient, input) pairs of every step of one call, reduced once.

    With ``projection`` (inputs (N, E), W (4H, E), bias (4H,)): ``projected`` holds inputs Wᵀ + bias for all
    steps at once, computed outside the autograd graph; the steps that read its rows in order hand their
    gate gradients back here, and the sink computes the gradients of inputs, W and bias, one GEMM each.
    """

    def __init__(self, weights: list[torch.Tensor],
                 projection: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        self.weights = weights
        self.grads: list[list[torch.Tensor]] = [[] for _ in weights]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in weights]
        self.projection = projection
        self.projected_grads: list[tuple[int, torch.Tensor]] = []
        self.projected = None
        if projection is not None:
            inputs, w, bias = projection
            with torch.no_grad():
                self.projected = torch.addmm(bias, inputs, w.t())
        sources = list(projection or ()) + weights
        # every step takes the token as an input; without autograd it is a placeholder
        self.token = _Sink.apply(self, *sources) if torch.is_grad_enabled() else torch.zeros(())

    def index(self, weight: torch.Tensor) -> int:
        return next(i for i, w in enumerate(self.weights) if w is weight)

    def keep(self, i: int, grad: torch.Tensor, inp: torch.Tensor) -> None:
        self.grads[i].append(grad)
        self.inputs[i].append(inp)

    def keep_projected(self, row: int, grad: torch.Tensor) -> None:
        self.projected_grads.append((row, grad))

    def reduce(self) -> list[torch.Tensor | None]:
        """Gradients of the projection's inputs, W and bias (if any), then of every weight."""
        out: list[torch.Tensor | None] = []
        if self.projection is not None:
            inputs, w, _ = self.projection
            parts = sorted(self.projected_grads, key=lambda part: part[0])
            starts = list(itertools.accumulate((g.size(0) for _, g in parts), initial=0))
            if [row for row, _ in parts] == starts[:-1] and starts[-1] == inputs.size(0):
                grad = torch.cat([g for _, g in parts])
            else:  # some steps got no gradient (nothing used their outputs)
                grad = self.projected.new_zeros(self.projected.shape)
                for row, g in parts:
                    grad[row:row + g.size(0)] += g
            out += [grad.mm(w), grad.t().mm(inputs), grad.sum(0)]
        out += [torch.cat(g).t().mm(torch.cat(x)) if g else None for g, x in zip(self.grads, self.inputs, strict=True)]
        self.grads = [[] for _ in self.weights]
        self.inputs = [[] for _ in self.weights]
        self.projected_grads = []
        return out


class _Sink(Function):
    @staticmethod
    def forward(ctx, store: WeightGrads, *weights: torch.Tensor) -> torch.Tensor:
        ctx.store = store
        ctx.set_materialize_grads(False)
        return weights[0].new_zeros(())

    @staticmethod
    def backward(ctx, _unused: torch.Tensor | None) -> tuple:
        return None, *ctx.store.reduce()


class _LSTMCell(Function):
    """gates = pre + x W_xᵀ + h W_hᵀ; (h', c') by the LSTM's gate equations."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor | None, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                w_x: torch.Tensor, w_h: torch.Tensor, token: torch.Tensor, store: WeightGrads, ix: int, ih: int,
                row: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        pre = bias if row is None else store.projected.narrow(0, row, x.size(0))
        gates = torch.addmm(pre, x, w_x.t()).addmm_(h, w_h.t())
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = torch.addcmul(f * c, i, g)
        tanh_c = c_new.tanh()
        ctx.save_for_backward(x, h, c, w_x, w_h, i, f, g, o, tanh_c)
        ctx.store, ctx.ix, ctx.ih, ctx.row = store, ix, ih, row
        ctx.set_materialize_grads(False)
        return o * tanh_c, c_new

    @staticmethod
    def backward(ctx, dh: torch.Tensor | None, dc: torch.Tensor | None) -> tuple:
        x, h, c, w_x, w_h, i, f, g, o, tanh_c = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(tanh_c)
        d_c = dh * o * (1 - tanh_c * tanh_c)
        if dc is not None:
            d_c = d_c + dc
        d_gates = torch.cat([d_c * g * i * (1 - i), d_c * c * f * (1 - f), d_c * i * (1 - g * g),
                             dh * tanh_c * o * (1 - o)], dim=1)
        ctx.store.keep(ctx.ix, d_gates, x)
        ctx.store.keep(ctx.ih, d_gates, h)
        if ctx.row is not None:
            ctx.store.keep_projected(ctx.row, d_gates)
        d_bias = d_gates.sum(0) if ctx.needs_input_grad[0] else None
        d_x = d_gates.mm(w_x) if ctx.needs_input_grad[1] else None
        d_h = d_gates.mm(w_h) if ctx.needs_input_grad[2] else None
        return d_bias, d_x, d_h, d_c * f, None, None, None, None, None, None, None


class _Linear(Function):
    """x Wᵀ (no bias)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, token: torch.Tensor, store: WeightGrads,
                i: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.store, ctx.i = store, i
        return x.mm(w.t())

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        ctx.store.keep(ctx.i, dy, x)
        return dy.mm(w) if ctx.needs_input_grad[0] else None, None, None, None, None


def lstm_cell(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], w_x: torch.Tensor, w_h: torch.Tensor,
              store: WeightGrads, *, bias: torch.Tensor | None = None,
              row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM cell step: gates = x W_xᵀ + h W_hᵀ + ``bias`` (4H,), or + rows ``row`` … ``row`` + N − 1 of
    ``store.projected``. W_x and W_h must be among ``store``'s weights; their gradients go there."""
    if (bias is None) == (row is None):
        raise ValueError("lstm_cell: give exactly one of bias and row")
    h, c = state
    return _LSTMCell.apply(bias, x, h, c, w_x, w_h, store.token, store, store.index(w_x), store.index(w_h), row)


def linear(x: torch.Tensor, w: torch.Tensor, store: WeightGrads) -> torch.Tensor:
    """x Wᵀ with W's gradient collected by ``store``."""
    return _Linear.apply(x, w, store.token, store, store.index(w))
