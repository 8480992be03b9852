"""The attentional seq2seq network; the forward p(T|S) and backward q(S|T) networks are two instances."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ami_dist.models.config import ModelConfig
from ami_dist.models.lstm import LSTMDecoder, LSTMEncoder, State

PARAM_INIT = 0.1  # OpenNMT-py's default uniform initialisation range, which the paper's models used


@dataclass
class EncoderOutput:
    memory: torch.Tensor  # (B, S, H) the memory bank the decoder attends to
    keys: torch.Tensor  # (B, S, H) memory projected for attention scores
    mask: torch.Tensor  # (B, S) True at real source tokens
    state: State  # final encoder state, the decoder's initial state


@dataclass
class DecoderState:
    rnn: State
    feed: torch.Tensor  # the previous attentional output (input feeding)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.src_emb = nn.Embedding(vocab_size, cfg.emb_dim, padding_idx=pad_id)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else nn.Embedding(vocab_size, cfg.emb_dim,
                                                                              padding_idx=pad_id)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.encoder = LSTMEncoder(cfg.emb_dim, cfg.hidden_size, cfg.enc_layers, cfg.dropout, cfg.bidirectional)
        self.decoder = LSTMDecoder(cfg.emb_dim, cfg.hidden_size, cfg.dec_layers, cfg.dropout, cfg.attention,
                                   cfg.input_feed)
        self.generator = nn.Linear(cfg.hidden_size, vocab_size)
        self.reset_parameters()
        if cfg.tie_generator:
            self.generator.weight = self.tgt_emb.weight

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.uniform_(p, -PARAM_INIT, PARAM_INIT)
        for emb in (self.src_emb, self.tgt_emb):
            with torch.no_grad():
                emb.weight[self.pad_id].zero_()

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderOutput:
        memory, state = self.encoder(self.emb_dropout(self.src_emb(src)), src_lengths)
        mask = torch.arange(src.size(1), device=src.device).unsqueeze(0) < src_lengths.unsqueeze(1)
        return EncoderOutput(memory, self.decoder.attn.keys(memory), mask, state)

    def perturbed(self, enc: EncoderOutput, memory: torch.Tensor) -> EncoderOutput:
        """``enc`` with its memory bank replaced by K perturbed copies (K, B, S, H), as one batch of K·B.

        Rows k·B .. k·B + B − 1 hold copy k (the layout of ``lns_sample``'s h_noisy flattened), so the
        decoder runs all K samples in one call. Attention keys are recomputed from the noisy memory; the
        mask and the decoder's initial state are tiled (latent noise sampling perturbs the memory bank).
        """
        k, batch = memory.shape[:2]
        flat = memory.reshape(k * batch, *memory.shape[2:])
        h, c = enc.state
        return EncoderOutput(flat, self.decoder.attn.keys(flat), enc.mask.repeat(k, 1),
                             (h.repeat(1, k, 1), c.repeat(1, k, 1)))

    def decode(self, tgt_in: torch.Tensor, enc: EncoderOutput,
               state: DecoderState | None = None) -> tuple[torch.Tensor, DecoderState]:
        """Attentional decoder outputs (B, T, H) for ``tgt_in``, continuing from ``state`` if given."""
        rnn_state, feed = (enc.state, None) if state is None else (state.rnn, state.feed)
        out, rnn_state, feed = self.decoder(self.emb_dropout(self.tgt_emb(tgt_in)), enc.memory, enc.keys,
                                            enc.mask, rnn_state, feed)
        return out, DecoderState(rnn_state, feed)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor | None = None, *,
                perturb: Callable[[Seq2Seq, EncoderOutput], EncoderOutput] | None = None,
                targets: Callable[[Seq2Seq, EncoderOutput], torch.Tensor] | None = None) -> torch.Tensor:
        """Teacher-forced logits (N, T, vocab) of the next token at every target position.

        Hooks let a caller change what is decoded inside one forward call (so a DeepSpeed engine sees a
        single forward, and dropout masks are shared): ``perturb`` replaces the encoder output (e.g. by
        K noisy copies, N = K·B), and ``targets`` chooses the decoder input from the (perturbed) encoder
        output instead of ``tgt_in`` (e.g. the network's own argmax predictions).
        """
        enc = self.encode(src, src_lengths)
        if perturb is not None:
            enc = perturb(self, enc)
        if targets is not None:
            tgt_in = targets(self, enc)
        if tgt_in is None:
            raise ValueError("forward needs tgt_in or a targets hook")
        out, _ = self.decode(tgt_in, enc)
        return self.generator(out)
