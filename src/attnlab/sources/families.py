"""Which Hugging Face model families attnlab reads, how, and with what status per command.

One :class:`Family` per ``config.model_type``. ``inputs`` says what the model is fed ('text' token ids or 'image'
pixel values), ``route`` how its attention is intercepted ('interface': transformers' ``AttentionInterface``; a
module name under ``attnlab.sources``: a one-file adapter; 'refused': not readable, ``reason`` says why). The
capture column is what ``tests/test_model_families.py`` checks on a tiny model of each family; the README table is :func:`markdown_table`
(a test keeps the two equal). A model type not listed here is tried through the interface and refused with one
line if no layer routes through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ModelError

YES, NO = "yes", "no"


@dataclass(frozen=True)
class Family:
    """One model family (``model_type``) and what works on it."""

    model_type: str
    name: str
    inputs: str = "text"  # 'text' | 'image'
    route: str = "interface"  # 'interface' | adapter module under attnlab.sources | 'refused'
    capture: str = YES
    spectrum: str = YES
    reconstruct: str = YES
    prefill: str = NO
    notes: str = ""
    reason: str = ""  # why a 'refused' family cannot be read

    @property
    def refused(self) -> bool:
        """True when attnlab cannot read this family's attention."""
        return self.route == "refused"


_ENC = "no (bidirectional encoder)"
_VISION = "no (image encoder: no token windows)"
_SW = "yes (sliding window: only the window's tiles run)"
_SW_CAP = "yes (sliding window; softcap as a FlexAttention score_mod)"
_PARTS_OK = "yes (encoder, decoder-self, cross)"
_PIX = "yes (synthetic image set)"


def _f(*args, **kw) -> Family:
    return Family(*args, **kw)


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    _f("bert", "BERT", prefill=_ENC),
    _f("roberta", "RoBERTa", prefill=_ENC),
    _f("distilbert", "DistilBERT", prefill=_ENC),
    _f("electra", "ELECTRA", prefill=_ENC),
    _f("modernbert", "ModernBERT", prefill=_ENC, notes="local (sliding) layers in the mask"),
    _f("gpt2", "GPT-2", prefill=YES),
    _f("gpt_neox", "GPT-NeoX", prefill=YES),
    _f("opt", "OPT", prefill=YES),
    _f("llama", "Llama", prefill=YES, notes="rotary, GQA"),
    _f("mistral", "Mistral", prefill=_SW, notes="sliding window in the mask"),
    _f("qwen2", "Qwen2", prefill=_SW, notes="sliding layers in the mask"),
    _f("qwen3", "Qwen3", prefill=YES),
    _f("phi3", "Phi-3", prefill=YES),
    _f("gemma2", "Gemma2", prefill=_SW_CAP, notes="eager fallback; softcap and sliding window in scores"),
    _f("gemma3_text", "Gemma3 (text)", prefill=_SW, notes="mixed sliding/full layers"),
    _f("gemma3", "Gemma3 (multimodal, text tower)", prefill=_SW,
       notes="sizes from config.get_text_config(); text inputs only"),
    _f("bart", "BART", reconstruct=_PARTS_OK, prefill="decoder only (loaded as BartForCausalLM)",
       notes="parts: encoder (default), decoder-self, cross; `--model DIR#part`"),
    _f("t5", "T5", reconstruct=_PARTS_OK, prefill="no (encoder-decoder)",
       notes="relative position bias in scores; parts: encoder (default), decoder-self, cross"),
    _f("falcon", "Falcon", route="falcon", prefill="no (own attention code)",
       notes="one-file adapter `sources/falcon.py`; rotary or ALiBi"),
    _f("vit", "ViT", inputs="image", spectrum=_PIX, reconstruct=_VISION, prefill=_ENC, notes="synthetic image set"),
    _f("clip_vision_model", "CLIP vision", inputs="image", spectrum=_PIX, reconstruct=_VISION, prefill=_ENC),
    _f("siglip_vision_model", "SigLIP vision", inputs="image", spectrum=_PIX, reconstruct=_VISION, prefill=_ENC),
    _f("bloom", "BLOOM", route="refused", capture=NO, spectrum=NO, reconstruct=NO,
       reason="BloomAttention computes ALiBi attention in its own code, not through transformers' AttentionInterface; "
              "an adapter like sources/falcon.py would be needed"),
    _f("mpt", "MPT", route="refused", capture=NO, spectrum=NO, reconstruct=NO,
       reason="MptAttention computes ALiBi attention in its own code, not through transformers' AttentionInterface; "
              "an adapter like sources/falcon.py would be needed"),
]}

#: encoder-decoder parts: role name -> description (layer order within a part is the model's)
PARTS = {"encoder": "encoder self-attention", "decoder-self": "decoder self-attention", "cross": "cross-attention"}


def family_of(config) -> Optional[Family]:
    """The registered family of a transformers config (None when unknown)."""
    return FAMILIES.get(getattr(config, "model_type", ""))


def check_supported(config, name: str) -> Optional[Family]:
    """The family, or ModelError (one line naming the family and the reason) for a refused one."""
    fam = family_of(config)
    if fam is not None and fam.refused:
        raise ModelError(f"--model {name}: {fam.name} ({fam.model_type}) cannot be captured: {fam.reason}")
    return fam


def markdown_table() -> str:
    """The README's table of families and what works on each (generated from :data:`FAMILIES`)."""
    head = "| family | model_type | inputs | capture | spectrum | reconstruct | prefill | notes |"
    lines = [head, "|" + "---|" * 8]
    for f in FAMILIES.values():
        cap = f.capture if not f.refused else f"no: {f.reason.split(';')[0]}"
        lines.append(f"| {f.name} | `{f.model_type}` | {f.inputs} | {cap} | {f.spectrum} | {f.reconstruct} | "
                     f"{f.prefill} | {f.notes} |")
    return "\n".join(lines)


def refuse_for_prefill(name: str, path: str) -> None:
    """ModelError (one line) for a family prefill cannot run: refused ones, and adapter families (prefill is
    validated on AttentionInterface families only). Unknown or unreadable configs pass (the loader says why)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except Exception:
        return
    fam = check_supported(config, name)
    if fam is not None and fam.route != "interface":
        raise ModelError(f"--model {name}: prefill is not validated on {fam.name}, whose attention attnlab reads "
                         f"through an adapter (sources/{fam.route}.py), not transformers' AttentionInterface")
