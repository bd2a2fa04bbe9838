"""Save fitted per-layer predictors as safetensors + JSON and load them back (``--predictor-path``).

One ``.safetensors`` file holds every learned tensor as ``{method}.{layer}.{attribute}`` (shared Sparsefinder
projectors as ``{method}.{layer}.projector.{name}``); its JSON metadata -- also written next to it as ``.json``
for reading -- holds each predictor's hyper-parameters and the setting they were fitted in (model identity,
sequence length, layers, heads, d_head, alpha). Loading checks that setting and refuses a file fitted on
another model or sequence length with a ``ConfigError`` naming ``--predictor-path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ...errors import ConfigError
from ...io import read_tensors, write_json, write_tensors
from .base import BasePredictor
from .distance import Projector

KIND = "attnlab sparsity predictors"
SETTING_KEYS = ("model", "seq_len", "n_layers", "n_heads", "d_head", "alpha")


def _scalars(obj: Any) -> dict:
    return {k: v for k, v in vars(obj).items() if isinstance(v, (int, float, str, bool, type(None)))}


def _tensors(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v.detach().cpu().clone().contiguous()  # shared projectors: one copy each
        elif isinstance(v, Projector) and k == "projector":
            out.update(_tensors(v, f"{prefix}projector."))
    return out


def save_predictors(path: str | Path, fitted: dict[str, list[BasePredictor]], setting: dict) -> Path:
    """Write ``fitted`` {method: [predictor per layer]} and the ``setting`` they were fitted in."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "predictors.safetensors"
    tensors, methods = {}, {}
    for m, preds in fitted.items():
        layers = []
        for l, p in enumerate(preds):
            tensors.update(_tensors(p, f"{m}.{l}."))
            proj = getattr(p, "projector", None)
            layers.append({"class": type(p).__name__, "config": _scalars(p),
                           "projector": None if proj is None else _scalars(proj)})
        methods[m] = layers
    meta = {"kind": KIND, "setting": setting, "methods": methods}
    write_tensors(path, tensors, meta)
    write_json(path.with_suffix(".json"), meta)
    return path


def check_setting(saved: dict, setting: dict, path: Path) -> None:
    """Raise ConfigError naming --predictor-path when a saved setting differs from the current one."""
    bad = [f"{k}: file {saved.get(k)!r} != this run {setting.get(k)!r}" for k in SETTING_KEYS
           if k in setting and saved.get(k) != setting.get(k)]
    if bad:
        raise ConfigError(f"--predictor-path {path}: predictors were fitted in another setting ({'; '.join(bad)}); "
                          "refit them (omit --predictor-path) or pass a file fitted on this model and sequence length")


def load_predictors(path: str | Path, methods: list[str], setting: Optional[dict] = None) -> dict[str, list[BasePredictor]]:
    """Load the predictors of ``methods`` saved by :func:`save_predictors`, after checking ``setting``."""
    from . import make_predictor

    path = Path(path)
    if path.is_dir():
        path = path / "predictors.safetensors"
    if not path.is_file():
        raise ConfigError(f"--predictor-path {path}: no such file")
    tensors, meta = read_tensors(path)
    if meta.get("kind") != KIND:
        raise ConfigError(f"--predictor-path {path}: not an attnlab predictor file (kind {meta.get('kind')!r})")
    if setting is not None:
        check_setting(meta.get("setting", {}), setting, path)
    missing = [m for m in methods if m not in meta["methods"]]
    if missing:
        raise ConfigError(f"--predictor-path {path}: no fitted predictors for {', '.join(missing)} "
                          f"(file has {', '.join(meta['methods'])}); choose --methods among those or refit")
    out: dict[str, list[BasePredictor]] = {}
    for m in methods:
        preds = []
        for l, rec in enumerate(meta["methods"][m]):
            p = make_predictor(m)
            if type(p).__name__ != rec["class"]:
                raise ConfigError(f"--predictor-path {path}: {m} layer {l} is a {rec['class']}, expected {type(p).__name__}")
            if rec.get("projector") is not None:
                proj = Projector(rec["projector"].get("rank", 4))
                proj.__dict__.update(rec["projector"])
                p.projector = proj
            p.__dict__.update(rec["config"])
            prefix = f"{m}.{l}."
            for key, t in tensors.items():
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    if name.startswith("projector."):
                        setattr(p.projector, name[len("projector."):], t)
                    else:
                        setattr(p, name, t)
            p._check()
            preds.append(p)
        out[m] = preds
    return out
