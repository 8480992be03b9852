"""Configuration of the seq2seq networks (the forward p(T|S) and backward q(S|T) are two instances)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ami_dist.typed_config import spec

Fail = Callable[[str, str], Exception]


@dataclass
class ModelConfig:
    family: Literal["lstm"] = spec("lstm", "model family (the Transformer arrives with the paper recipes)")
    emb_dim: int = spec(500, "word embedding size", gt=0)
    hidden_size: int = spec(500, "LSTM hidden size (encoder output size when bidirectional)", gt=0)
    enc_layers: int = spec(2, "encoder LSTM layers", gt=0)
    dec_layers: int = spec(2, "decoder LSTM layers (must equal enc_layers: the encoder state starts it)", gt=0)
    bidirectional: bool = spec(False, "bidirectional encoder; each direction gets hidden_size / 2 units")
    dropout: float = spec(0.3, "dropout on embeddings, between LSTM layers and on attention outputs", ge=0, lt=1)
    attention: Literal["general", "dot"] = spec("general", "Luong global attention score function")
    input_feed: bool = spec(
        True, "feed the previous attentional state into the next decoder step (OpenNMT's default)"
    )
    share_embeddings: bool = spec(False, "one embedding table for source and target (shared vocabulary)")
    tie_generator: bool = spec(False, "generator weight = target embedding (needs emb_dim == hidden_size)")

    def validate(self, fail: Fail) -> None:
        if self.dec_layers != self.enc_layers:
            raise fail("dec_layers", f"must equal enc_layers ({self.enc_layers}): the encoder's final state "
                       "initialises the decoder")
        if self.bidirectional and self.hidden_size % 2:
            raise fail("hidden_size", f"must be even for a bidirectional encoder, got {self.hidden_size}")
        if self.tie_generator and self.emb_dim != self.hidden_size:
            raise fail("tie_generator", f"needs emb_dim == hidden_size, got {self.emb_dim} and {self.hidden_size}")
