"""Seq2seq networks and their config; nothing here knows about ranks, DeepSpeed or MLflow."""

from ami_dist.models.config import ModelConfig
from ami_dist.models.lstm import LSTMSeq2Seq
from ami_dist.models.seq2seq import DecoderState, EncoderOutput, Seq2Seq
from ami_dist.models.transformer import TransformerSeq2Seq

__all__ = ["DecoderState", "EncoderOutput", "LSTMSeq2Seq", "ModelConfig", "Seq2Seq", "TransformerSeq2Seq",
           "build_model"]

FAMILIES = {"lstm": LSTMSeq2Seq, "transformer": TransformerSeq2Seq}


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int, initialise: bool = True) -> Seq2Seq:
    """A freshly initialised network of the configured family (``initialise=False``: its modules' default
    initialisation only, for a caller that runs ``init_plan`` itself)."""
    return FAMILIES[cfg.family](cfg, vocab_size, pad_id, initialise)
