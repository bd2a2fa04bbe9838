"""Our small transformer with pluggable attention."""

from .attention import AttentionOverride, dense_attention, graph_override, masked_entmax, masked_softmax, normaliser
from .transformer import SmallTransformer, TransformerConfig, TransformerOutput

__all__ = [
    "AttentionOverride", "SmallTransformer", "TransformerConfig", "TransformerOutput", "dense_attention",
    "graph_override", "masked_entmax", "masked_softmax", "normaliser",
]
