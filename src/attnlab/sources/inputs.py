"""What a source is fed: token windows from a corpus for text models, synthetic images for vision encoders."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import ConfigError


def is_image(src: Any) -> bool:
    """True for sources fed pixel values (vision encoders)."""
    return getattr(src, "inputs", "text") == "image"


def input_windows(src: Any, seq_len: int, corpus: Optional[str], n: int, split: str = "all", seed: int = 0,
                  text_field: str = "text") -> torch.Tensor:
    """(n, seq_len) token windows of ``corpus`` for text models; (n, C, S, S) pixel values of the seeded synthetic
    image set for image models (each image gives ``src.fixed_len`` tokens). ConfigError for a model with neither."""
    if is_image(src):
        if corpus is not None:
            raise ConfigError(f"--corpus {corpus}: {src.name} is an image model; it reads attnlab's synthetic image "
                              "set (image folders are not supported yet): leave --corpus out")
        if n < 1:
            raise ConfigError(f"--n-sequences must be >= 1 (got {n})")
        return src.processor.synthetic(n, seed=seed)
    if src.tokenizer is None:
        raise ConfigError(f"{src.name} has no tokenizer: pass windows=(M, seq_len) token ids")
    from ..capture.corpus import select_windows

    return select_windows(src.tokenizer, seq_len, corpus, n, split, seed, text_field)


def fixed_seq_len(src: Any, seq_len: int) -> int:
    """The sequence length to use: the model's fixed one (vision: patches + CLS) when it has one, else ``seq_len``."""
    return int(getattr(src, "fixed_len", None) or seq_len)
