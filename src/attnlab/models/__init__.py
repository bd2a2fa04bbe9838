"""Our small transformer with pluggable attention (through the handlers of ``attnlab.attention``)."""

from .attention import dense_attention, masked_entmax, masked_softmax, normaliser
from .transformer import SmallTransformer, TransformerConfig, TransformerOutput

__all__ = [
    "SmallTransformer", "TransformerConfig", "TransformerOutput", "dense_attention", "masked_entmax", "masked_softmax",
    "normaliser",
]
