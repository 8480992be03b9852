"""Seq2seq networks and their config; nothing here knows about ranks, DeepSpeed or MLflow."""

from ami_dist.models.config import ModelConfig
from ami_dist.models.seq2seq import DecoderState, EncoderOutput, Seq2Seq

__all__ = ["DecoderState", "EncoderOutput", "ModelConfig", "Seq2Seq", "build_model"]


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int) -> Seq2Seq:
    """A freshly initialised network of the configured family."""
    return Seq2Seq(cfg, vocab_size, pad_id)
