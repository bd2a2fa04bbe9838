"""Tiny random-weight models of every family in ``attnlab.sources.families`` (hidden 32, 2 layers, 4 heads,
vocabulary 100), with query/key projections scaled up so softmax differences show. Built in memory, seeded."""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

V, H, L, NH, FF, P = 100, 32, 2, 4, 64, 64
QK = re.compile(r"(q_proj|k_proj|qkv_proj|query|key|q_lin|k_lin|c_attn|query_key_value|Wqkv)[^.]*\.weight$|"
                r"(SelfAttention|EncDecAttention)\.[qk]\.weight$")
QK_NORM = re.compile(r"(q_norm|k_norm)\.weight$")  # q/k RMSNorms undo a projection's scale: scale them instead
SCALE = 16.0
SCALE_BY_FAMILY = {"t5": 5.0, "clip_vision_model": 10.0, "siglip_vision_model": 6.0}  # T5: no 1/sqrt(d); vision: larger inputs


def _text(**kw: Any) -> dict:
    return {**dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
                   max_position_embeddings=P), **kw}


def _llama_like(**kw: Any) -> dict:
    return _text(**{"num_key_value_heads": 2, **kw})


def _vision(**kw: Any) -> dict:
    return dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF, image_size=32,
                patch_size=8, **kw)


def _gemma(**kw: Any) -> dict:
    return _llama_like(**{"head_dim": 8, "sliding_window": 4, **kw})


# model_type -> (transformers class name, config class name, config kwargs)
SPECS: dict[str, tuple[str, str, Callable[[], dict]]] = {
    "bert": ("BertModel", "BertConfig", _text),
    "roberta": ("RobertaModel", "RobertaConfig", lambda: _text(pad_token_id=1)),
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   lambda: dict(vocab_size=V, dim=H, n_layers=L, n_heads=NH, hidden_dim=FF, max_position_embeddings=P)),
    "electra": ("ElectraModel", "ElectraConfig", lambda: _text(embedding_size=H)),
    "modernbert": ("ModernBertModel", "ModernBertConfig",
                   lambda: _text(local_attention=4, global_attn_every_n_layers=2, pad_token_id=0)),
    "gpt2": ("GPT2Model", "GPT2Config", lambda: dict(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=P)),
    "gpt_neox": ("GPTNeoXModel", "GPTNeoXConfig", _text),
    "opt": ("OPTModel", "OPTConfig", lambda: dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, ffn_dim=FF,
                                                  num_attention_heads=NH, max_position_embeddings=P,
                                                  word_embed_proj_dim=H)),
    "llama": ("LlamaModel", "LlamaConfig", _llama_like),
    "mistral": ("MistralModel", "MistralConfig", lambda: _llama_like(sliding_window=4)),
    "qwen2": ("Qwen2Model", "Qwen2Config", lambda: _llama_like(use_sliding_window=True, sliding_window=4,
                                                               max_window_layers=1)),
    "qwen3": ("Qwen3Model", "Qwen3Config", lambda: _llama_like(head_dim=8)),
    "phi3": ("Phi3Model", "Phi3Config", lambda: _llama_like(pad_token_id=0)),
    "gemma2": ("Gemma2Model", "Gemma2Config", lambda: _gemma(attn_logit_softcapping=20.0, query_pre_attn_scalar=8)),
    "gemma3_text": ("Gemma3TextModel", "Gemma3TextConfig", lambda: _gemma(sliding_window_pattern=2)),
    "gemma3": ("Gemma3Model", "Gemma3Config",
               lambda: dict(text_config=_gemma(), vision_config=_vision(num_channels=3), mm_tokens_per_image=4)),
    "bart": ("BartModel", "BartConfig",
             lambda: dict(vocab_size=V, d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=NH,
                          decoder_attention_heads=NH, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                          max_position_embeddings=P)),
    "t5": ("T5Model", "T5Config", lambda: dict(vocab_size=V, d_model=H, d_kv=8, d_ff=FF, num_layers=L,
                                               num_heads=NH, decoder_start_token_id=0)),
    "falcon": ("FalconModel", "FalconConfig", lambda: dict(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                          num_attention_heads=NH)),
    "vit": ("ViTModel", "ViTConfig", _vision),
    "clip_vision_model": ("CLIPVisionModel", "CLIPVisionConfig", _vision),
    "siglip_vision_model": ("SiglipVisionModel", "SiglipVisionConfig", _vision),
    "bloom": ("BloomModel", "BloomConfig", lambda: dict(vocab_size=V, hidden_size=H, n_layer=L, n_head=NH)),
    "mpt": ("MptModel", "MptConfig", lambda: dict(vocab_size=V, d_model=H, n_layers=L, n_heads=NH, max_seq_len=P)),
}


def available(model_type: str) -> bool:
    """Whether the installed transformers has this family's model class."""
    import transformers

    cls, cfg, _ = SPECS[model_type]
    return hasattr(transformers, cls) and hasattr(transformers, cfg)


def build(model_type: str, seed: int = 0, impl: str = "sdpa", cls: str | None = None,
          **overrides: Any) -> torch.nn.Module:
    """The tiny model of ``model_type`` (eval mode), query/key weights scaled by SCALE; ``cls`` another class
    name of the family (e.g. 'MistralForCausalLM')."""
    import transformers

    base, cfg, kw = SPECS[model_type]
    cls = cls or base
    config = getattr(transformers, cfg)(**{**kw(), **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if QK_NORM.search(name):  # Gemma's norms multiply by (1 + w), w = 0 at init; Qwen3's by w = 1
                p.copy_(p * 4.0 if p.abs().mean() > 0.5 else p + 3.0)
            elif QK.search(name):
                p.mul_(SCALE_BY_FAMILY.get(model_type, SCALE))
    if impl == "eager" or not getattr(type(model), "_supports_sdpa", False):
        model.set_attn_implementation("eager")
    else:
        try:
            model.set_attn_implementation(impl)
        except Exception:  # families that refuse a dynamic switch keep their own choice
            pass
    return model
