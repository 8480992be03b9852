"""The LSTM family: encoder, attentional decoder (Luong et al., 2015, global attention), batch-first."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ami_dist.models import stepwise
from ami_dist.models.config import ModelConfig
from ami_dist.models.dropout import Dropout, dropout, keep_mask
from ami_dist.models.seq2seq import EncoderOutput, Seq2Seq, source_mask, target_lengths

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
        """emb (B, S, E), lengths (B,) -> memory (B, S, hidden) (zeros after each row's end), final state.

        Padding stays out of the recurrence: the final state is each row's last real token's, and the
        backward direction of a bidirectional encoder starts at the real end of each sentence. Rows run
        longest first in one fused LSTM call per layer, direction and distinct length: the packed-sequence
        LSTM would step every token through autograd on CPU, several times slower.
        """
        steps = emb.size(1)
        lengths = lengths.clamp(min=1, max=steps).cpu()
        order = torch.argsort(lengths, descending=True, stable=True)
        unorder = torch.argsort(order)
        ragged = _Ragged(lengths[order].tolist(), steps)
        x = emb.index_select(0, order)
        weights = self.rnn.all_weights  # per layer and direction: w_ih, w_hh, b_ih, b_hh
        directions = 2 if self.bidirectional else 1
        hs, cs = [], []
        for layer in range(self.layers):
            if layer and self.rnn.dropout:
                x = dropout(x, self.rnn.dropout, self.training)
            outs = []
            for direction in range(directions):
                params = weights[layer * directions + direction]
                out, h, c = ragged.run(x if direction == 0 else ragged.reverse(x), params, self.training)
                outs.append(out if direction == 0 else ragged.reverse(out))
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
        # per layer: the directions side by side, (layers, B, hidden)
        h, c = (torch.stack([torch.cat(v[i:i + directions], dim=-1) for i in range(0, len(v), directions)])
                for v in (hs, cs))
        return x.index_select(0, unorder), (h.index_select(1, unorder), c.index_select(1, unorder))


class _Ragged:
    """Runs one LSTM layer and direction over rows sorted longest first with the given lengths: one fused
    call per distinct length, each on the rows still running, from the state where the previous one ended."""

    def __init__(self, lengths: list[int], steps: int) -> None:
        self.lengths, self.steps = lengths, steps
        self.ends = sorted(set(lengths))
        self._reverse_index: torch.Tensor | None = None

    def run(self, x: torch.Tensor, params: list[torch.Tensor],
            training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, in) -> outputs (B, S, hidden) with zeros after each row's end, final h and c (B, hidden)."""
        batch, hidden = x.size(0), params[1].size(1)
        h = c = x.new_zeros(batch, hidden)
        outs, done_h, done_c, start = [], [], [], 0
        for end in self.ends:
            rows = sum(length >= end for length in self.lengths)  # the first `rows` rows are still running
            out, h, c = torch.lstm(x[:rows, start:end], (h[:rows][None], c[:rows][None]), params, True, 1, 0.0,
                                   training, False, True)
            h, c = h[0], c[0]
            outs.append(F.pad(out, (0, 0, 0, 0, 0, batch - rows)))
            running = sum(length > end for length in self.lengths)
            done_h.append(h[running:])
            done_c.append(c[running:])
            start = end
        out = torch.cat(outs, dim=1)
        if start < self.steps:
            out = F.pad(out, (0, 0, 0, self.steps - start))
        # rows ended shortest first, i.e. from the bottom of the batch up
        return out, torch.cat(done_h[::-1]), torch.cat(done_c[::-1])

    def reverse(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's real tokens in reverse order (padding stays where it is)."""
        if self._reverse_index is None:
            t = torch.arange(self.steps)
            lengths = torch.tensor(self.lengths).unsqueeze(1)
            self._reverse_index = torch.where(t < lengths, lengths - 1 - t, t)
        return x.gather(1, self._reverse_index.unsqueeze(-1).expand_as(x))


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

    def context(self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        """The attention-weighted memory: query (B, T, H), memory/keys (B, S, H), mask (B, S) -> (B, T, H)."""
        scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.masked_fill(~memory_mask.unsqueeze(1), float("-inf"))
        return torch.bmm(torch.softmax(scores, dim=-1), memory)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        """query (B, T, H), memory/keys (B, S, H), memory_mask (B, S) True at real tokens -> (B, T, H)."""
        context = self.context(query, memory, keys, memory_mask)
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
        self.dropout = Dropout(dropout)

    def forward(self, emb: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, memory_mask: torch.Tensor,
                state: State, feed: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, State, torch.Tensor]:
        """emb (B, T, E) -> attentional outputs (B, T, H), the new LSTM state and the last output (input feed).

        ``keys`` is ``self.attn.keys(memory)``, computed once per source. ``feed`` is the previous step's
        attentional output (zeros at the start of a sentence). With input feeding, ``lengths`` (B,) says
        how many leading positions of each row are real: the rest is not computed (outputs there are
        zeros), and the returned state and feed are those after each row's last real position.
        """
        if not self.input_feed:
            out, state = self.rnn(emb, state)
            attn_out = self.dropout(self.attn(out, memory, keys, memory_mask))
            return attn_out, state, attn_out[:, -1]
        batch, steps = emb.shape[:2]
        if feed is None:
            feed = emb.new_zeros(batch, self.hidden_size)
        if lengths is None or not bool((lengths < steps).any()):
            inputs = emb.transpose(0, 1).reshape(steps * batch, -1)
            out, state, feed = self._steps(inputs, [batch] * steps, memory, keys, memory_mask, state, feed)
            return torch.stack(out, dim=1), state, feed
        # Rows longest first, so the rows still running at step t are the first n_t: the packed layout.
        packed = pack_padded_sequence(emb, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        out, (h, c), feed = self._steps(packed.data, packed.batch_sizes.tolist(), memory.index_select(0, order),
                                        keys.index_select(0, order), memory_mask.index_select(0, order),
                                        (state[0].index_select(1, order), state[1].index_select(1, order)),
                                        feed.index_select(0, order))
        outputs, _ = pad_packed_sequence(PackedSequence(torch.cat(out), packed.batch_sizes, order, unorder),
                                         batch_first=True, total_length=steps)
        return outputs, (h.index_select(1, unorder), c.index_select(1, unorder)), feed.index_select(0, unorder)

    def _steps(self, inputs: torch.Tensor, rows: list[int], memory: torch.Tensor, keys: torch.Tensor,
               memory_mask: torch.Tensor, state: State,
               feed: torch.Tensor) -> tuple[list[torch.Tensor], State, torch.Tensor]:
        """The input-feeding recurrence over time-major packed ``inputs`` (Σ rows, E): step t runs the first
        rows[t] rows (non-increasing). Returns each step's output (rows[t], H), the final state and feed."""
        # The LSTM's own weights, one cell per layer and token (a length-1 call of the fused multi-layer
        # LSTM costs several times more on CPU); weight gradients are summed over steps by one GEMM each.
        weights = self.rnn.all_weights  # per layer: w_ih, w_hh, b_ih, b_hh
        emb_dim = inputs.size(1)
        # the cells' input weights: layer 0 reads the input feed (its embedding part is precomputed below)
        w_in = [weights[0][0][:, emb_dim:], *(w_ih for w_ih, _, _, _ in weights[1:])]
        w_hh = [w for _, w, _, _ in weights]
        w_out = self.attn.linear_out.weight
        # Layer 0's input projection of the embeddings (with its biases) for all steps at once.
        store = stepwise.WeightGrads([*w_in, *w_hh, w_out],
                                     projection=(inputs, weights[0][0][:, :emb_dim], weights[0][2] + weights[0][3]))
        biases = [None, *(b_ih + b_hh for _, _, b_ih, b_hh in weights[1:])]
        starts = list(itertools.accumulate(rows[:-1], initial=0))
        between, after = self._dropout_masks(len(rows), rows[0], inputs)
        h, c = list(state[0].unbind(0)), list(state[1].unbind(0))
        views: dict[int, tuple[torch.Tensor, ...]] = {}
        outputs, done = [], []
        for t, n in enumerate(rows):
            if n < feed.size(0):  # rows n.. ended at the previous step: keep their final state
                done.append((torch.stack([x[n:] for x in h]), torch.stack([x[n:] for x in c]), feed[n:]))
                h, c, feed = [x[:n] for x in h], [x[:n] for x in c], feed[:n]
            if n not in views:
                views[n] = (memory[:n], keys[:n], memory_mask[:n])
            x = feed
            for layer in range(len(weights)):
                if layer and between is not None:
                    x = x * between[layer - 1, t, :n]
                h[layer], c[layer] = stepwise.lstm_cell(x, (h[layer], c[layer]), w_in[layer], w_hh[layer], store,
                                                        bias=biases[layer], row=None if layer else starts[t])
                x = h[layer]
            context = self.attn.context(x.unsqueeze(1), *views[n]).squeeze(1)
            feed = torch.tanh(stepwise.linear(torch.cat([context, x], dim=-1), w_out, store))
            if after is not None:
                feed = feed * after[t, :n]
            outputs.append(feed)
        # rows in order: those still running, then the ones that ended, latest first
        hs, cs, feeds = zip((torch.stack(h), torch.stack(c), feed), *reversed(done), strict=True)
        return outputs, (torch.cat(hs, dim=1), torch.cat(cs, dim=1)), torch.cat(feeds)

    def _dropout_masks(self, steps: int, batch: int,
                       like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Inverted-dropout masks for all steps at once: between LSTM layers (layers − 1, T, B, H) and on
        the attentional output (T, B, H); None where no dropout applies (evaluation, p = 0)."""
        def draw(p: float, *shape: int) -> torch.Tensor | None:
            if not self.training or p == 0:
                return None
            return keep_mask(shape, p, like)

        layers = self.rnn.num_layers
        return (draw(self.rnn.dropout, layers - 1, steps, batch, self.hidden_size) if layers > 1 else None,
                draw(self.dropout.p, steps, batch, self.hidden_size))


@dataclass
class LSTMState:
    rnn: State
    feed: torch.Tensor  # the previous attentional output (input feeding)

    def select(self, index: torch.Tensor) -> LSTMState:
        h, c = self.rnn
        return LSTMState((h.index_select(1, index), c.index_select(1, index)), self.feed.index_select(0, index))


class LSTMSeq2Seq(Seq2Seq):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, initialise: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.src_emb = nn.Embedding(vocab_size, cfg.emb_dim, padding_idx=pad_id)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else nn.Embedding(vocab_size, cfg.emb_dim,
                                                                              padding_idx=pad_id)
        self.emb_dropout = Dropout(cfg.dropout)
        self.encoder = LSTMEncoder(cfg.emb_dim, cfg.hidden_size, cfg.enc_layers, cfg.dropout, cfg.bidirectional)
        self.decoder = LSTMDecoder(cfg.emb_dim, cfg.hidden_size, cfg.dec_layers, cfg.dropout, cfg.attention,
                                   cfg.input_feed)
        self.generator = nn.Linear(cfg.hidden_size, vocab_size)
        if initialise:
            self.reset_parameters()
        if cfg.tie_generator:
            self.generator.weight = self.tgt_emb.weight

    def init_plan(self) -> list[tuple[str, Callable[[torch.Tensor], None]]]:
        def uniform(p: torch.Tensor) -> None:
            nn.init.uniform_(p, -PARAM_INIT, PARAM_INIT)

        plan = [(name, uniform) for name, _ in self.named_parameters()]
        return plan + [(f"{emb}.weight", self.zero_padding_row) for emb in ("src_emb", "tgt_emb")]

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> EncoderOutput:
        memory, state = self.encoder(self.emb_dropout(self.src_emb(src)), src_lengths)
        return EncoderOutput(memory, source_mask(src, src_lengths), self.memory_keys(memory), state)

    def memory_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.decoder.attn.keys(memory)

    def decode(self, tgt_in: torch.Tensor, enc: EncoderOutput,
               state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        rnn_state, feed = (enc.state, None) if state is None else (state.rnn, state.feed)
        # a row's length: up to its last non-pad token (padding after it is not computed); a single step
        # (greedy and beam decoding) has nothing to skip
        lengths = None
        if tgt_in.size(1) > 1:
            lengths = target_lengths(tgt_in, self.pad_id)
        out, rnn_state, feed = self.decoder(self.emb_dropout(self.tgt_emb(tgt_in)), enc.memory, enc.keys,
                                            enc.mask, rnn_state, feed, lengths)
        return out, LSTMState(rnn_state, feed)
