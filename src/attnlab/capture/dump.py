"""`attnlab capture`: save raw pre-softmax scores (and optionally q/k) of a few sequences to safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError
from ..io import RunDir, write_tensors
from ..attention import AttentionCall, check_heads, check_layers
from ..sources import as_source
from .run import Model, resolve_model, stream_attention

TENSORS = "capture.safetensors"
DEFAULT_MAX_BYTES = 2 * 1024**3


def capture_scores(model: Model, windows: torch.Tensor, layers: Optional[list[int]] = None,
                   heads: Optional[list[int]] = None, batch_size: int = 8, with_qk: bool = False,
                   max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = False) -> dict[str, torch.Tensor]:
    """Scores (M, h, N, N) float32 per layer as ``scores.{layer}`` (-inf where masked); q/k if ``with_qk``.

    Raises ConfigError if the result would exceed ``max_bytes`` (use fewer --n-sequences, layers or heads,
    or the streaming ``spectrum`` command instead).
    """
    from ..validate import check_option

    check_option("batch_size", batch_size, "batch_size")
    if not isinstance(windows, torch.Tensor) or windows.dim() < 2:
        raise ConfigError("windows must be a (M, seq_len) tensor of token ids (or (M, C, H, W) images), got "
                          f"{tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__}")
    src = as_source(model)
    layers = check_layers(layers, src.n_layers)
    heads = check_heads(heads, src.n_heads)
    M, N = windows.shape[0], int(getattr(src, "fixed_len", None) or windows.shape[1])
    need = M * len(layers) * len(heads) * N * N * 4
    if need > max_bytes:
        raise ConfigError(f"capturing {M} sequences x {len(layers)} layers x {len(heads)} heads x {N}^2 scores needs "
                          f"{need / 2**30:.1f} GiB (> {max_bytes / 2**30:.1f} GiB): lower --n-sequences/--layers/--heads "
                          "or use `attnlab spectrum`, which streams")
    parts: dict[str, list[torch.Tensor]] = {}
    head_idx = torch.tensor(heads)

    def sink(call: AttentionCall) -> None:
        parts.setdefault(f"scores.{call.layer}", []).append(call.scores(head_idx.to(call.query.device)).cpu())
        if with_qk:
            parts.setdefault(f"query.{call.layer}", []).append(call.query[:, head_idx].float().cpu())
            parts.setdefault(f"key.{call.layer}", []).append(call.key[:, head_idx].float().cpu())

    stream_attention(src, windows, sink, layers, batch_size, desc="capture", show_progress=progress)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["pixel_values" if windows.is_floating_point() else "input_ids"] = windows.clone()
    return out


def capture(out: str | Path, model: str | Model = "minilm", corpus: Optional[str] = None, seq_len: int = 128,
            n_sequences: int = 8, layers: Optional[list[int]] = None, heads: Optional[list[int]] = None,
            batch_size: int = 8, with_qk: bool = False, split: str = "all", device: str = "cpu", seed: int = 0,
            text_field: str = "text", progress: bool = True) -> dict[str, Any]:
    """Capture scores of ``n_sequences`` windows into ``out/capture.safetensors``; returns a summary."""
    if n_sequences < 1:
        raise ConfigError(f"--n-sequences must be >= 1 (got {n_sequences})")
    m = resolve_model(model, device, seq_len)
    from ..sources.inputs import input_windows, is_image

    if m.tokenizer is None and not is_image(m):
        raise ConfigError("capture() needs a model with a tokenizer; for our own model use capture_scores(model, windows)")
    seq_len = int(getattr(m, "fixed_len", None) or seq_len)
    windows = input_windows(m, seq_len, corpus, n_sequences, split, seed, text_field)
    tensors = capture_scores(m, windows, layers, heads, batch_size, with_qk, progress=progress)
    run = RunDir(out)
    meta = {"model": m.describe(), "seq_len": seq_len, "layers": check_layers(layers, m.n_layers),
            "heads": check_heads(heads, m.n_heads), "n_sequences": int(len(windows))}
    write_tensors(run.file(TENSORS), tensors, meta)
    run.write_section("capture", {**meta, "file": TENSORS, "tensors": sorted(tensors)})
    return meta
