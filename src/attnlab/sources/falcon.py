"""Falcon adapter: the worked example of a family whose attention bypasses transformers' AttentionInterface.

``FalconAttention.forward`` computes attention inline (SDPA, or eager when weights are asked for), so the
interface never sees it. :func:`install` wraps each layer's ``forward``: when attnlab has hooked the layer
(``_attnlab_handler`` set by :func:`attnlab.sources.hf.attention_hooks`, as for every family), the wrapper
computes q, k, v with the module's own projections, head split and rotary embedding, builds the same
:class:`~attnlab.attention.AttentionCall` (the model's mask, with ALiBi folded in by ``FalconModel``, becomes
``valid`` + ``bias``; scaling 1/sqrt(head_dim)), and hands it to the handler. A replacement output goes through
the module's output projection; otherwise (or during the probe) the module's original forward runs unchanged.

Transformers 5.x notes, measured on tiny random models: ``output_attentions=True`` on an SDPA-loaded Falcon
adds the boolean mask to the scores (weights off by up to 1.0), and the eager ALiBi path adds ALiBi twice (the
model already folds it into the mask). The SDPA path adds it once, as the original Falcon-RW code did; so do we.

To add an adapter for another family: copy this file, replace :func:`_qkv` with that family's q/k/v code and
:func:`install`'s class test, set ``route="<module name>"`` for its model_type in ``sources/families.py``.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch

from ..errors import ModelError
from .hf import make_call


def _qkv(module: Any, hidden: torch.Tensor, alibi: Optional[torch.Tensor], position_embeddings: Any):
    """q (B, H, N, d), k and v (B, H_kv, N, d) exactly as ``FalconAttention.forward`` builds them."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    q, k, v = module._split_heads(module.query_key_value(hidden))
    B, N = q.shape[0], q.shape[1]
    n_kv = module.num_heads if module.new_decoder_architecture else module.num_kv_heads
    q = q.transpose(1, 2).reshape(B, module.num_heads, N, module.head_dim)
    k = k.transpose(1, 2).reshape(B, n_kv, N, module.head_dim)
    v = v.transpose(1, 2).reshape(B, n_kv, N, module.head_dim)
    if alibi is None:
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
             output_attentions=False, position_embeddings=None, **kwargs):
    handler = getattr(self, "_attnlab_handler", None)
    layer = getattr(self, "_attnlab_layer", None)
    if handler is None or layer is None:
        if handler is not None:  # probe: report this module with its shapes and mask
            q, k, _ = _qkv(self, hidden_states, alibi, position_embeddings)
            handler((self, q, k, attention_mask))
        return self._attnlab_original_forward(hidden_states, alibi, attention_mask, position_ids, layer_past,
                                              use_cache, output_attentions, position_embeddings, **kwargs)
    if layer_past is not None and layer_past.get_seq_length(self.layer_idx) > 0:
        raise ModelError("the Falcon adapter reads whole-sequence attention only (no KV cache); call with use_cache=False")
    q, k, v = _qkv(self, hidden_states, alibi, position_embeddings)
    out = handler(make_call(layer, q, k, v, attention_mask, self.inv_norm_factor))
    if out is None:
        return self._attnlab_original_forward(hidden_states, alibi, attention_mask, position_ids, layer_past,
                                              use_cache, output_attentions, position_embeddings, **kwargs)
    B, H, N, D = out.shape
    return self.dense(out.transpose(1, 2).reshape(B, N, H * D)), None


def needed(model: torch.nn.Module) -> bool:
    """True when this transformers' FalconAttention computes attention in its own code (ALiBi passed as
    ``alibi``); from transformers 5.25 it calls the AttentionInterface (ALiBi inside ``attention_mask``) and the
    generic route reads it."""
    import inspect

    from transformers.models.falcon.modeling_falcon import FalconAttention

    return "alibi" in inspect.signature(FalconAttention.forward).parameters


def install(model: torch.nn.Module) -> int:
    """Wrap every FalconAttention of ``model`` (idempotent); returns how many were wrapped."""
    from transformers.models.falcon.modeling_falcon import FalconAttention

    n = 0
    for m in model.modules():
        if isinstance(m, FalconAttention) and not hasattr(m, "_attnlab_original_forward"):
            if type(m) is not FalconAttention:
                raise ModelError(f"the Falcon adapter reads FalconAttention (eager/SDPA), not {type(m).__name__}; "
                                 "load the model with attn_implementation='sdpa'")
            m._attnlab_original_forward = m.forward
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n
