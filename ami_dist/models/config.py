"""Configuration of the seq2seq networks (the forward p(T|S) and backward q(S|T) are two instances)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ami_dist.typed_config import spec

Fail = Callable[[str, str], Exception]


@dataclass
class ModelConfig:
    family: Literal["lstm", "transformer"] = spec("lstm", "network family")
    emb_dim: int = spec(500, "word embedding size (transformer: must equal hidden_size)", gt=0)
    hidden_size: int = spec(500, "LSTM hidden size / Transformer d_model (encoder output size)", gt=0)
    enc_layers: int = spec(2, "encoder layers", gt=0)
    dec_layers: int = spec(2, "decoder layers (LSTM: must equal enc_layers, the encoder state starts it)", gt=0)
    dropout: float = spec(0.3, "dropout on embeddings, between layers, on attention and sublayer outputs", ge=0, lt=1)
    share_embeddings: bool = spec(False, "one embedding table for source and target (shared vocabulary)")
    tie_generator: bool = spec(False, "generator weight = target embedding (needs emb_dim == hidden_size)")
    # LSTM
    bidirectional: bool = spec(False, "LSTM: bidirectional encoder; each direction gets hidden_size / 2 units")
    attention: Literal["general", "dot"] = spec("general", "LSTM: Luong global attention score function")
    input_feed: bool = spec(
        True, "LSTM: feed the previous attentional state into the next decoder step (OpenNMT's default)"
    )
    # Transformer
    heads: int = spec(8, "Transformer: attention heads (must divide hidden_size)", gt=0)
    ffn_size: int = spec(2048, "Transformer: inner size of the position-wise feed-forward layers", gt=0)
    norm: Literal["post", "pre"] = spec("post", "Transformer: layer norm after (base Transformer) or before sublayers")

    def validate(self, fail: Fail) -> None:
        if self.family == "lstm":
            if self.dec_layers != self.enc_layers:
                raise fail("dec_layers", f"must equal enc_layers ({self.enc_layers}) for an LSTM: the encoder's "
                           "final state initialises the decoder")
            if self.bidirectional and self.hidden_size % 2:
                raise fail("hidden_size", f"must be even for a bidirectional encoder, got {self.hidden_size}")
        else:
            if self.hidden_size % self.heads:
                raise fail("heads", f"{self.heads} heads do not divide hidden_size (d_model) {self.hidden_size}")
            if self.emb_dim != self.hidden_size:
                raise fail("emb_dim", f"must equal hidden_size ({self.hidden_size}) for a Transformer, "
                           f"got {self.emb_dim}")
            if (self.hidden_size // self.heads) % 2:
                raise fail("heads", f"head size {self.hidden_size // self.heads} must be even")
        if self.tie_generator and self.emb_dim != self.hidden_size:
            raise fail("tie_generator", f"needs emb_dim == hidden_size, got {self.emb_dim} and {self.hidden_size}")
