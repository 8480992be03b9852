"""The LSTM family: encoder, attentional decoder (Luong et al., 2015, global attention), batch-first."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ami_dist.models.config import ModelConfig
from ami_dist.models.seq2seq import EncoderOutput, Seq2Seq, source_mask

PARAM_INIT = 0.1  # OpenNMT-py's default uniform initialisation range, which the paper's LSTMs used

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (layers, B, hidden)


class LSTMEncoder(nn.Module):
    """Reads embedded source tokens; returns the memory bank (B, S, hidden) and the final state."""

    def __init__(self, emb_dim: int, hidden_size: int, layers: int, dropout: float, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.layers = layers
        per_direction = hidden_size // 2 if bidirectional else hidden_size
        self.rnn = nn.LSTM(emb_dim, per_direction, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                           bidirectional=bidirectional, batch_first=True)

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, State]:
        # Packing keeps padding out of the recurrence: the final state is the last real token's, and
        # the backward direction of a bidirectional encoder starts at the real end of each sentence.
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, c) = self.rnn(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=emb.size(1))
        if self.bidirectional:
            h, c = (self._join_directions(x) for x in (h, c))
        return memory, (h, c)

    def _join_directions(self, x: torch.Tensor) -> torch.Tensor:
        # (layers * 2, B, H/2) -> (layers, B, H): forward and backward halves side by side per layer.
        _, batch, half = x.shape
        return x.view(self.layers, 2, batch, half).permute(0, 2, 1, 3).reshape(self.layers, batch, 2 * half)


class GlobalAttention(nn.Module):
    """Luong attention: scores against every memory position, context, and tanh(W_c [context; query])."""

    def __init__(self, hidden_size: int, score: str = "general") -> None:
        super().__init__()
        self.score = score
        self.linear_in = nn.Linear(hidden_size, hidden_size, bias=False) if score == "general" else None
        self.linear_out = nn.Linear(2 * hidden_size, hidden_size, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Memory projected for scoring; computed once per source, reused at every decoder step."""
        return memory if self.linear_in is None else self.linear_in(memory)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        """query (B, T, H), memory/keys (B, S, H), memory_mask (B, S) True at real tokens -> (B, T, H)."""
        scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.masked_fill(~memory_mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights, memory)
        return torch.tanh(self.linear_out(torch.cat([context, query], dim=-1)))


class LSTMDecoder(nn.Module):
    """Attentional LSTM decoder; with input feeding, each step also reads the previous attentional state.

    Without input feeding the whole target runs through the LSTM in one call (teacher forcing), which is
    several times faster on CPU; with it, the decoder steps token by token as in OpenNMT-py's default.
    """

    def __init__(self, emb_dim: int, hidden_size: int, layers: int, dropout: float, attention: str,
                 input_feed: bool) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_feed = input_feed
        in_dim = emb_dim + hidden_size if input_feed else emb_dim
        self.rnn = nn.LSTM(in_dim, hidden_size, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                           batch_first=True)
        self.attn = GlobalAttention(hidden_size, attention)
        self.dropout = nn.Dropout(dropout)

    def forward(self, emb: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, memory_mask: torch.Tensor,
                state: State, feed: torch.Tensor | None = None) -> tuple[torch.Tensor, State, torch.Tensor]:
        """emb (B, T, E) -> attentional outputs (B, T, H), the new LSTM state and the last output (input feed).

        ``keys`` is ``self.attn.keys(memory)``, computed once per source. ``feed`` is the previous step's
        attentional output (zeros at the start of a sentence).
        """
        if not self.input_feed:
            out, state = self.rnn(emb, state)
            attn_out = self.dropout(self.attn(out, memory, keys, memory_mask))
            return attn_out, state, attn_out[:, -1]
        if feed is None:
            feed = emb.new_zeros(emb.size(0), self.hidden_size)
        # Token by token, through the LSTM's own weights one layer cell at a time: on CPU a length-1 call
        # of the fused multi-layer LSTM costs several times more, mostly in its backward pass.
        weights = self.rnn.all_weights  # per layer: w_ih, w_hh, b_ih, b_hh
        last = len(weights) - 1
        h, c = list(state[0].unbind(0)), list(state[1].unbind(0))
        outputs = []
        for t in range(emb.size(1)):
            x = torch.cat([emb[:, t], feed], dim=-1)
            for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
                h[layer], c[layer] = torch.lstm_cell(x, (h[layer], c[layer]), w_ih, w_hh, b_ih, b_hh)
                x = h[layer] if layer == last else F.dropout(h[layer], self.rnn.dropout, self.training)
            feed = self.dropout(self.attn(x.unsqueeze(1), memory, keys, memory_mask)).squeeze(1)
            outputs.append(feed)
        return torch.stack(outputs, dim=1), (torch.stack(h), torch.stack(c)), feed


@dataclass
class LSTMState:
    rnn: State
    feed: torch.Tensor  # the previous attentional output (input feeding)

    def select(self, index: torch.Tensor) -> LSTMState:
        h, c = self.rnn
        return LSTMState((h.index_select(1, index), c.index_select(1, index)), self.feed.index_select(0, index))


class LSTMSeq2Seq(Seq2Seq):
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
        return EncoderOutput(memory, source_mask(src, src_lengths), self.memory_keys(memory), state)

    def memory_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.decoder.attn.keys(memory)

    def decode(self, tgt_in: torch.Tensor, enc: EncoderOutput,
               state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        rnn_state, feed = (enc.state, None) if state is None else (state.rnn, state.feed)
        out, rnn_state, feed = self.decoder(self.emb_dropout(self.tgt_emb(tgt_in)), enc.memory, enc.keys,
                                            enc.mask, rnn_state, feed)
        return out, LSTMState(rnn_state, feed)
