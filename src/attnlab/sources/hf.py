"""HuggingFace ``transformers`` attention source: intercept every attention call of a loaded model.

We register an attention implementation named ``attnlab`` in transformers' ``AttentionInterface`` (and an
eager-style additive mask for it). Each layer's attention module then hands us the query and key *after*
rotary embeddings, with the model's own mask and extra score terms (T5's ``position_bias``, Gemma's
``softcap``), for any architecture that routes attention through that interface. A handler sees one
:class:`AttentionCall` per layer and may return a replacement output; otherwise the model's *own*
implementation runs (the one it was loaded with: SDPA, or the family's eager code), so outputs are unchanged.
Families that bypass the interface get a one-file adapter (``attnlab.sources.falcon``) that sets the same
per-module attributes from a wrapped ``forward``. Loading lives in :mod:`attnlab.sources.loading`.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from ..attention import AttentionCall, Handler, check_layers, stop_quietly
from ..errors import ModelError
from .families import PARTS

IMPL_NAME = "attnlab"
DEFAULT_MODEL = "minilm"
_PROBE_ENC, _PROBE_DEC = 4, 3  # probe lengths: cross-attention is the call with Nq=3, Nk=4


@dataclass
class HFModel:
    """A loaded HF model with the facts attnlab needs (sizes and causality come from a probing forward)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    n_layers: int = 0
    n_heads: int = 0
    head_dim: int = 0
    max_len: int = 512
    causal: bool = False
    family: str = ""  # config.model_type
    part: str = "self"  # 'self', or for encoder-decoder models 'encoder' | 'decoder-self' | 'cross'
    inputs: str = "text"  # 'text' (token ids) | 'image' (pixel values)
    processor: Any = None  # image preprocessing (attnlab.sources.images.ImageInputs) for image models
    fixed_len: Optional[int] = None  # tokens per input when the model fixes it (vision: patches + CLS)
    sliding_window: Optional[int] = None  # the text config's sliding window, if any
    route: str = "interface"  # 'interface' or an adapter module name
    forward_kw: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """JSON-friendly summary."""
        keys = ("name", "n_layers", "n_heads", "head_dim", "max_len", "causal", "family", "part", "inputs")
        out = {k: getattr(self, k) for k in keys}
        if self.part in PARTS:
            out["attention"] = PARTS[self.part]
        return out

    def hooks(self, handler: Handler, layers: Optional[list[int]] = None):
        """Route ``layers`` (all if None) through ``handler`` while the context is open (:func:`attention_hooks`)."""
        return attention_hooks(self, handler, layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kw):
        """One forward pass without gradients (:func:`run_forward`)."""
        return run_forward(self, input_ids, attention_mask, **kw)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPL_NAME, _dispatch)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_NAME, eager_mask)


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


def make_call(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
              scaling: Optional[float], softcap: Optional[float] = None,
              extra_bias: Optional[torch.Tensor] = None, window: Optional[int] = None) -> AttentionCall:
    """An :class:`AttentionCall` from one attention call's tensors; ``extra_bias`` (e.g. T5's position bias,
    (1|B, H, Nq, Nk)) is added to the scores alongside the mask's finite part; ``window``: the sliding window
    the model passed to its attention function (``sliding_window``, as FlashAttention reads it)."""
    n_heads = query.shape[1]
    valid, bias = _split_mask(mask)
    if extra_bias is not None:
        extra = extra_bias[..., : query.shape[2], : key.shape[2]]
        bias = extra if bias is None else bias + extra
    return AttentionCall(layer, query, _repeat_kv(key, n_heads), _repeat_kv(value, n_heads), valid, bias,
                         float(scaling if scaling is not None else query.shape[-1] ** -0.5), softcap,
                         None if window is None else int(window))


def _own_implementation(module) -> Callable:
    """The attention function the module used before we switched it: a registered one, or its family's eager."""
    from transformers import AttentionInterface

    name = getattr(module, "_attnlab_fallback", "sdpa")
    if name in (None, "eager"):
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ModelError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
        return fn
    return AttentionInterface()[name]


def _dispatch(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: call the module's handler, else the model's own implementation."""
    handler: Optional[Handler] = getattr(module, "_attnlab_handler", None)
    if handler is not None:
        layer = module._attnlab_layer
        if layer is None:  # probing pass: record call order, shapes and mask
            handler((module, query, key, attention_mask))  # type: ignore[arg-type]
        else:
            call = make_call(layer, query, key, value, attention_mask, scaling, kwargs.get("softcap"),
                             kwargs.get("position_bias"), kwargs.get("sliding_window"))
            out = handler(call)
            if out is not None:
                return out.transpose(1, 2).contiguous(), None  # HF expects (B, N, H, dh)
    return _own_implementation(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Probe: which modules compute attention, in which role, with which shapes and mask
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Probed:
    """One attention module seen by the probe."""

    module: torch.nn.Module
    role: str  # 'self' | 'encoder' | 'decoder-self' | 'cross'
    n_heads: int
    head_dim: int
    n_query: int
    causal: bool


def _is_causal(mask: Optional[torch.Tensor], module) -> bool:
    if mask is None:
        return bool(getattr(module, "is_causal", False))
    valid, _ = _split_mask(mask)
    v = valid.reshape(-1, *valid.shape[-2:])[0]
    n = min(v.shape)
    return bool(n > 1 and not v[0, 1:].any() and v.diagonal().all())


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """An encoder-decoder *as loaded* (BartForCausalLM is the decoder alone although its config says otherwise)."""
    import inspect

    return bool(getattr(model.config, "is_encoder_decoder", False)) and (
        "decoder_input_ids" in inspect.signature(model.forward).parameters)


def _role(hf: HFModel, nq: int, nk: int) -> str:
    if not is_encoder_decoder(hf.model):
        return "self"
    if nq != nk:
        return "cross"
    return "encoder" if nq == _PROBE_ENC else "decoder-self"


def probe(hf: HFModel) -> list[Probed]:
    """Attention modules in call order with role, heads, head size and causality, from a short forward pass
    through our dispatcher (cached on the model). ModelError when none routes through the interface."""
    cached = getattr(hf.model, "_attnlab_probed", None)
    if cached is not None:
        return cached
    seen: list[tuple] = []
    candidates = [m for m in hf.model.modules() if hasattr(m, "config") and not isinstance(m, type(hf.model))]
    for m in candidates:
        m._attnlab_layer = None
        m._attnlab_handler = seen.append
    try:
        with _implementation(hf), torch.no_grad():
            hf.model(**probe_inputs(hf))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"--model {hf.name}: the probing forward of {type(hf.model).__name__} failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); attnlab cannot capture it") from e
    finally:
        for m in candidates:
            del m._attnlab_handler, m._attnlab_layer
    out: list[Probed] = []
    for module, q, k, mask in seen:
        if all(p.module is not module for p in out):
            out.append(Probed(module, _role(hf, q.shape[2], k.shape[2]), q.shape[1], q.shape[-1], q.shape[2],
                              _is_causal(mask, module)))
    if not out:
        raise ModelError(f"--model {hf.name}: {type(hf.model).__name__} does not route attention through "
                         "transformers' AttentionInterface and has no attnlab adapter; attnlab cannot capture it")
    hf.model._attnlab_probed = out
    return out


def probe_inputs(hf: HFModel) -> dict[str, torch.Tensor]:
    """Tiny inputs for the probe: token ids (decoder ids one shorter for encoder-decoders) or a blank image."""
    device = next(hf.model.parameters()).device
    if hf.inputs == "image":
        return {"pixel_values": hf.processor.blank(1).to(device)}
    tc = hf.model.config.get_text_config() if hasattr(hf.model.config, "get_text_config") else hf.model.config
    tok = min(getattr(hf.tokenizer, "cls_token_id", None) or 1, int(getattr(tc, "vocab_size", 2) or 2) - 1)
    kw = {"input_ids": torch.full((1, _PROBE_ENC), tok, device=device)}
    if is_encoder_decoder(hf.model):
        kw["decoder_input_ids"] = torch.full((1, _PROBE_DEC), tok, device=device)
    return {**kw, **hf.forward_kw}


def attention_modules(hf: HFModel) -> list[torch.nn.Module]:
    """The attention modules of ``hf.part`` in layer order."""
    mods = [p.module for p in probe(hf) if p.role == hf.part]
    if not mods:
        roles = sorted({p.role for p in probe(hf)})
        raise ModelError(f"--model {hf.name}: no {hf.part} attention layers (this model has: {', '.join(roles)})")
    return mods


@contextlib.contextmanager
def _implementation(hf: HFModel) -> Iterator[None]:
    """Switch the model to our implementation (interface route only), remembering each module's own."""
    if hf.route != "interface":
        yield
        return
    _register()
    mods = [m for m in hf.model.modules() if hasattr(m, "config")]
    before = [getattr(m.config, "_attn_implementation", None) for m in mods]
    for m, impl in zip(mods, before):
        m._attnlab_fallback = impl
    previous = hf.model.config._attn_implementation
    hf.model.set_attn_implementation(IMPL_NAME)
    try:
        yield
    finally:
        hf.model.set_attn_implementation(previous)
        for m, impl in zip(mods, before):  # sub-configs (vision/text towers) back to their own choice
            if impl is not None and getattr(m.config, "_attn_implementation", None) != impl:
                m.config._attn_implementation = impl


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


def model_inputs(hf: HFModel, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Keyword inputs of one forward: pixel values for image models; token ids otherwise (encoder-decoders get
    the same ids as decoder inputs, so every part sees N tokens)."""
    device = next(hf.model.parameters()).device
    if hf.inputs == "image":
        return {"pixel_values": x.to(device, next(hf.model.parameters()).dtype)}
    kw: dict[str, Any] = {"input_ids": x.to(device),
                          "attention_mask": None if attention_mask is None else attention_mask.to(device)}
    if is_encoder_decoder(hf.model) and hf.part != "encoder":
        kw["decoder_input_ids"] = kw["input_ids"]
        kw["decoder_attention_mask"] = kw["attention_mask"]
    return {**kw, **hf.forward_kw}


def run_forward(hf: HFModel, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kw):
    """One forward pass (no grad) that treats :class:`StopForward` as a normal early end; returns outputs or None.
    The encoder part of an encoder-decoder runs the encoder alone."""
    model = hf.model.get_encoder() if hf.part == "encoder" else hf.model
    inputs = model_inputs(hf, input_ids, attention_mask)
    with torch.no_grad():
        return stop_quietly(lambda: model(**inputs, **kw))


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32,
               head: Optional[str] = None) -> HFModel:
    """Load a model (HF hub id or local folder, ``DIR#part`` for a part of an encoder-decoder); see
    :func:`attnlab.sources.loading.load_model`."""
    from .loading import load_model as _load

    return _load(name, device=device, dtype=dtype, head=head)


def resolve_model_path(name: str) -> str:
    """Map aliases ('minilm', 'default') to the packaged MiniLM folder (or $ATTNLAB_MINILM_DIR); pass others through."""
    from .loading import resolve_model_path as _resolve

    return _resolve(name)
