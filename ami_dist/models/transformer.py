"""The Transformer family (Vaswani et al., 2017): sinusoidal positions, pre- or post-norm layers, and
incremental decoding with cached keys and values, batch-first."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ami_dist.models.config import ModelConfig
from ami_dist.models.dropout import Dropout
from ami_dist.models.seq2seq import EncoderOutput, Seq2Seq, source_mask, target_lengths

KV = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (B, heads, length, head_dim)


class Packing:
    """The live positions of a (B, T) batch, for running position-wise layers on them only.

    Teacher-forced targets are right-padded: with length-bucketed batches about a quarter of the decoder's
    positions are padding. Projections, feed-forward layers and normalisations see the (N, D) rows of live
    positions; attention sees them scattered back into (B, T, D) with zeros elsewhere (a live position
    never attends to a later one, so padding is never read).
    """

    def __init__(self, live: torch.Tensor) -> None:
        self.shape = live.shape
        self.index = live.reshape(-1).nonzero().squeeze(1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...), the live positions in row-major order."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the positions that are not live."""
        out = x.new_zeros(self.shape.numel(), *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(*self.shape, *x.shape[1:])


def live_positions(tgt_in: torch.Tensor, pad_id: int) -> Packing | None:
    """Each row's positions up to its last non-pad token, or None when that is every position."""
    steps = torch.arange(1, tgt_in.size(1) + 1, device=tgt_in.device)
    live = steps[None, :] <= target_lengths(tgt_in, pad_id)[:, None]
    return None if bool(live.all()) else Packing(live)


def sinusoids(start: int, length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Positional encodings of positions start .. start + length − 1, (length, dim)."""
    position = torch.arange(start, start + length, device=device, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * rate)
    pe[:, 1::2] = torch.cos(position * rate)
    return pe


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        if packing is not None:
            x = packing.unpack(x)
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, packing: Packing | None = None) -> KV:
        return self._split(self.key(x), packing), self._split(self.value(x), packing)

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """x (B, T, D), or its live rows (N, D) with ``packing``, attends to kv; mask broadcastable to
        (B, heads, T, S), True where attention is allowed. The output has the shape of x."""
        q = self._split(self.query(x), packing)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.out(out if packing is None else packing.pack(out))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, inner: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, inner), nn.ReLU(), Dropout(dropout), nn.Linear(inner, dim))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn = MultiHeadAttention(cfg.hidden_size, cfg.heads, cfg.dropout)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_size, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            h = self.norm1(x)
            x = x + self.drop(self.attn(h, self.attn.keys_values(h), mask))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, self.attn.keys_values(x), mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.hidden_size, cfg.heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.hidden_size, cfg.heads, cfg.dropout)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_size, cfg.dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden_size) for _ in range(3))
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KV | None, causal: torch.Tensor, cross: KV,
                memory_mask: torch.Tensor, packing: Packing | None = None) -> tuple[torch.Tensor, KV]:
        """One layer over the new positions x (B, T, D), or their live rows (N, D) with ``packing``;
        ``cache`` holds earlier positions' self-attention K/V."""
        h = self.norms[0](x) if self.pre_norm else x
        k, v = self.self_attn.keys_values(h, packing)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        a = self.drop(self.self_attn(h, (k, v), causal, packing))
        x = x + a if self.pre_norm else self.norms[0](x + a)
        h = self.norms[1](x) if self.pre_norm else x
        a = self.drop(self.cross_attn(h, cross, memory_mask, packing))
        x = x + a if self.pre_norm else self.norms[1](x + a)
        h = self.norms[2](x) if self.pre_norm else x
        a = self.drop(self.ffn(h))
        x = x + a if self.pre_norm else self.norms[2](x + a)
        return x, (k, v)


@dataclass
class TransformerState:
    self_kv: list[KV]  # per layer, the self-attention keys/values of every position decoded so far
    cross_kv: list[KV]  # per layer, keys/values of the memory bank (computed once per source)
    length: int  # positions decoded so far

    def select(self, index: torch.Tensor) -> TransformerState:
        pick = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]
        cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
        return TransformerState(pick, cross, self.length)


class TransformerSeq2Seq(Seq2Seq):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, initialise: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.dim = cfg.hidden_size
        self.src_emb = nn.Embedding(vocab_size, cfg.hidden_size, padding_idx=pad_id)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else nn.Embedding(vocab_size, cfg.hidden_size,
                                                                              padding_idx=pad_id)
        self.drop = Dropout(cfg.dropout)
        self.enc_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.dec_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        # Pre-norm stacks end with a normalisation of their own (their residual stream is never normalised).
        self.enc_norm = nn.LayerNorm(cfg.hidden_size) if cfg.norm == "pre" else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.hidden_size) if cfg.norm == "pre" else nn.Identity()
        self.generator = nn.Linear(cfg.hidden_size, vocab_size)
        if initialise:
            self.reset_parameters()
        if cfg.tie_generator:
            self.generator.weight = self.tgt_emb.weight

    def init_plan(self) -> list[tuple[str, Callable[[torch.Tensor], None]]]:
        def matrix_or_bias(p: torch.Tensor) -> None:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)

        def embedding(p: torch.Tensor) -> None:
            nn.init.normal_(p, std=self.dim**-0.5)
            self.zero_padding_row(p)

        plan = [(name, matrix_or_bias) for name, p in self.named_parameters() if p.dim() > 1 or "norm" not in name]
        return plan + [(f"{emb}.weight", embedding) for emb in ("src_emb", "tgt_emb")]

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor, start: int, packing: Packing | None = None) -> torch.Tensor:
        positions = sinusoids(start, ids.size(1), self.dim, ids.device)
        if packing is not None:  # only the live positions, (N, D)
            positions = positions.expand(ids.size(0), -1, -1)
            ids, positions = packing.pack(ids), packing.pack(positions)
        return self.drop(emb(ids) * math.sqrt(self.dim) + positions)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderOutput:
        mask = source_mask(src, src_lengths)
        attn_mask = mask[:, None, None, :]
        x = self._embed(self.src_emb, src, 0)
        for layer in self.enc_layers:
            x = layer(x, attn_mask)
        return EncoderOutput(self.enc_norm(x), mask)

    def decode(self, tgt_in: torch.Tensor, enc: EncoderOutput,
               state: TransformerState | None = None) -> tuple[torch.Tensor, TransformerState]:
        if state is None:
            cross = [layer.cross_attn.keys_values(enc.memory) for layer in self.dec_layers]
            state = TransformerState([], cross, 0)
        start, new = state.length, tgt_in.size(1)
        # New position start + i may attend to every position up to itself, cached ones included.
        positions = torch.arange(start + new, device=tgt_in.device)
        causal = positions[None, :] <= (start + torch.arange(new, device=tgt_in.device))[:, None]
        # Teacher forcing: padding after each row's last token is not computed (one token at a time, as
        # greedy and beam search decode, has none).
        packing = live_positions(tgt_in, self.pad_id) if new > 1 else None
        x = self._embed(self.tgt_emb, tgt_in, start, packing)
        memory_mask = enc.mask[:, None, None, :]
        caches = []
        for i, layer in enumerate(self.dec_layers):
            x, kv = layer(x, state.self_kv[i] if state.self_kv else None, causal, state.cross_kv[i], memory_mask,
                          packing)
            caches.append(kv)
        x = self.dec_norm(x)
        return x if packing is None else packing.unpack(x), TransformerState(caches, state.cross_kv, start + new)
