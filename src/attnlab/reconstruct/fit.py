"""Fitted artefacts for reconstruction: per (layer, head) row statistics and query/key moments.

We store sufficient statistics (float64 sums), not derived matrices, so that any variant can be derived
on load: the row mean and covariance, the mean per query position with the covariance of the residual
(query-position-conditioned model), statistics pooled over the heads of a layer, eigenbases, and the
query/key second moments that the adaptive selection's proxy needs, and (optionally, a second pass once the
proxies are known) the statistics of the proxy's residual rows s - p for the ``proxy+gaussian`` estimator.
Rows are centred over their valid keys (masked entries 0), as in ``attnlab.spectral``. Saved as safetensors with JSON metadata naming the
model and sequence length; loading checks both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..attention import check_heads, check_layers
from ..sources.hf import HFModel
from ..errors import ConfigError, ResultsError, ShapeError
from ..io import RunDir, read_tensors, write_tensors
from ..spectral.stats import StreamingCovariance
from .collectors import FitCollector, ProxySpec, ResidualCollector, residual_prefix  # noqa: F401  (re-exported)
from .estimators import RowModel
from .selection import Proxy, make_proxy

FIT_FILE = "reconstruct_fit.safetensors"
KIND = "attnlab.reconstruct.fit"


class ReconstructionFit:
    """Fitted statistics for every (layer, head) of one model at one sequence length."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        self.t, self.meta = tensors, dict(meta)
        self.seq_len = int(meta["seq_len"])
        self.model_name = str(meta["model"])
        self.layers = [int(x) for x in meta["layers"]]
        self.heads = [int(x) for x in meta["heads"]]
        self._cache: dict = {}

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write safetensors + JSON metadata (model, seq_len, layers, heads)."""
        return write_tensors(path, self.t, {**self.meta, "kind": KIND})

    @classmethod
    def load(cls, path: str | Path, model: Optional[str] = None, seq_len: Optional[int] = None) -> "ReconstructionFit":
        """Load and check it belongs to ``model`` / ``seq_len`` when given."""
        p = Path(path)
        if p.is_dir():
            p = p / FIT_FILE
        tensors, meta = read_tensors(p)
        if meta.get("kind") != KIND or "seq_len" not in meta:
            raise ResultsError(f"{p}: not an attnlab reconstruction fit (no '{KIND}' metadata)")
        fit = cls(tensors, meta)
        fit.check(model, seq_len, str(p))
        return fit

    def check(self, model: Optional[str] = None, seq_len: Optional[int] = None, where: str = "fit") -> None:
        """Raise a clear error when this fit is used with another model or sequence length."""
        if seq_len is not None and int(seq_len) != self.seq_len:
            raise ShapeError(f"{where}: statistics were fitted at --seq-len {self.seq_len}, but --seq-len {seq_len} was "
                             "asked; refit at that length (a row basis lives in R^seq_len)")
        if model is not None and str(model) != self.model_name:
            raise ConfigError(f"{where}: statistics were fitted on --model {self.model_name}, not {model}; "
                              "refit for that model")

    # --- derived statistics -------------------------------------------------------------------------
    def _head_sums(self, layer: int, head: int) -> dict[str, torch.Tensor]:
        key = f"{layer}.{head}"
        if f"sxx.{key}" not in self.t:
            raise ConfigError(f"--layers/--heads: no statistics for layer {layer} head {head} in this fit "
                              f"(fitted layers {self.layers}, heads {self.heads})")
        return {n: self.t.get(f"{n}.{key}") for n in ("sx", "cnt", "sxx", "sqq", "skk", "nq", "nk", "sxt")}

    def _sums(self, layer: int, head: Optional[int]) -> dict[str, Optional[torch.Tensor]]:
        if head is not None:
            return self._head_sums(layer, head)
        parts = [self._head_sums(layer, h) for h in self.heads]
        return {n: (None if parts[0][n] is None else sum(p[n] for p in parts)) for n in parts[0]}

    def row_model(self, layer: int, head: int, position: bool = False, pool_heads: bool = False) -> RowModel:
        """Mean and covariance of centred rows; ``position``: mean per query position and residual covariance;
        ``pool_heads``: one model for all heads of the layer (the naive baseline)."""
        ck = (layer, None if pool_heads else head, position)
        if ck in self._cache:
            return self._cache[ck]
        s = self._sums(layer, None if pool_heads else head)
        sxx = s["sxx"]
        if s["cnt"] is not None:
            cnt, sx = s["cnt"], s["sx"]  # (N,), (N, N)
            n_rows = float(cnt.sum())
            total = sx.sum(0)
        else:
            if position:
                raise ConfigError("--position needs per-position sums; this fit came from a spectrum run "
                                  "(only mean/covariance): pass --no-position, or fit from a corpus")
            n_rows = float(s["nq"].sum())
            total = s["sxt"]
        if n_rows < 2:
            raise ConfigError(f"layer {layer} head {head}: fewer than 2 rows were fitted; use more sequences")
        mean = total / n_rows
        if position:
            pos_mean = sx / cnt.clamp_min(1).unsqueeze(-1)  # (N, N)
            outer = torch.einsum("i,in,im->nm", cnt, pos_mean, pos_mean)
            dof = max(n_rows - int((cnt > 0).sum()), 1.0)
            cov = (sxx - outer) / dof
            model = RowModel(pos_mean, 0.5 * (cov + cov.T))
        else:
            cov = (sxx - n_rows * torch.outer(mean, mean)) / (n_rows - 1)
            model = RowModel(mean, 0.5 * (cov + cov.T))
        self._cache[ck] = model
        return model

    def eigen(self, layer: int, head: int, position: bool = False, pool_heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending) and eigenvectors of the row covariance (cached)."""
        ck = ("eig", layer, None if pool_heads else head, position)
        if ck not in self._cache:
            cov = self.row_model(layer, head, position, pool_heads).cov
            evals, evecs = np.linalg.eigh(cov.double().numpy())  # numpy's LAPACK is faster here than torch's
            self._cache[ck] = (torch.from_numpy(evals[::-1].copy()).clamp_min(0), torch.from_numpy(evecs[:, ::-1].copy()))
        return self._cache[ck]

    def rank_for(self, layer: int, head: int, level: float = 0.9, position: bool = False, pool_heads: bool = False) -> int:
        """Smallest k whose top-k eigenvalues explain ``level`` of the variance."""
        evals, _ = self.eigen(layer, head, position, pool_heads)
        curve = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
        return int((curve < level - 1e-12).sum()) + 1

    def residual_model(self, layer: int, head: int, kind: str = "bilinear", rank: int = 4, seed: int = 0,
                       position: bool = False) -> RowModel:
        """Mean and covariance of the row-centred residual rows s - p of one proxy (``proxy+gaussian``);
        ``position``: mean per query position and the covariance around it (within-position scatter)."""
        ck = ("resid", layer, head, kind, rank, seed, position)
        if ck in self._cache:
            return self._cache[ck]
        pre, lh = residual_prefix(kind, rank, seed), f"{layer}.{head}"
        if f"{pre}.m2.{lh}" not in self.t:
            raise ConfigError(f"no residual statistics of the {kind} rank-{rank} proxy (seed {seed}) for layer {layer} "
                              f"head {head} in this fit: refit from a corpus with that proxy in residual_proxies "
                              "(attnlab reconstruct run does so when --estimators has proxy+gaussian), or leave proxy+gaussian out")
        stats = StreamingCovariance.from_state({k: self.t[f"{pre}.{k}.{lh}"] for k in ("n", "mean", "m2")})
        cov, mean = stats.covariance(), stats.mean
        if position:
            sums = self.t[f"{pre}.pos.{lh}"]
            cnt = sums[:, -1]
            pos_mean = sums[:, :-1] / cnt.clamp_min(1).unsqueeze(-1)
            d = (pos_mean - mean) * (cnt > 0).unsqueeze(-1)
            between = torch.einsum("i,in,im->nm", cnt, d, d)  # total scatter = within + between positions
            dof = max(stats.n - int((cnt > 0).sum()), 1)
            cov = (stats.m2 - between) / dof
            mean = pos_mean
        model = RowModel(mean, 0.5 * (cov + cov.T))
        self._cache[ck] = model
        return model

    def proxy(self, layer: int, head: int, kind: str = "bilinear", rank: int = 4, seed: int = 0) -> Proxy:
        """The adaptive selection's low-rank score proxy for this head (cached)."""
        ck = ("proxy", layer, head, kind, rank, seed)
        if ck not in self._cache:
            self._cache[ck] = self._proxy(layer, head, kind, rank, seed)
        return self._cache[ck]

    def _proxy(self, layer: int, head: int, kind: str, rank: int, seed: int) -> Proxy:
        s = self._head_sums(layer, head)
        d_head = int(self.meta.get("d_head") or (s["sqq"].shape[0] if s["sqq"] is not None else 0))
        cq = None if s["sqq"] is None else s["sqq"] / s["nq"].clamp_min(1)
        ckk = None if s["skk"] is None else s["skk"] / s["nk"].clamp_min(1)
        return make_proxy(kind, rank, d_head, cq, ckk, seed=seed + 1000 * layer + head)


def load_checked(model: str, seq_len: int, head: Optional[str] = None, device: str = "cpu") -> HFModel:
    """Load an HF model by name (onto ``device``) and check ``seq_len`` fits it."""
    from ..sources.hf import load_model

    hf = load_model(model, device=device, head=head)
    if seq_len > hf.max_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's maximum of {hf.max_len} positions")
    return hf


def windows_for(tokenizer, seq_len: int, n: int, split: str, corpus: Optional[str] = None, seed: int = 0,
                flag: str = "--n-fit", minimum: int = 1) -> torch.Tensor:
    """``n`` windows drawn with ``seed`` from a pool of 4n windows of one corpus split ('fit' or 'heldout');
    warns when fewer are available, raises CorpusError below ``minimum``."""
    from ..capture.corpus import select_windows

    if n < 1:
        raise ConfigError(f"{flag} must be >= 1 (got {n})")
    return select_windows(tokenizer, seq_len, corpus, n, split, seed, flag=flag, minimum=minimum)


def fit_from_windows(model: HFModel | Any, windows: torch.Tensor, layers: Optional[list[int]] = None,
                     heads: Optional[list[int]] = None, batch_size: int = 8, model_name: Optional[str] = None,
                     progress: bool = False, residual_proxies: Sequence[ProxySpec] = (),
                     chunk_rows: int = 512) -> ReconstructionFit:
    """Fit statistics from token windows (M, seq_len) through any model ``stream_attention`` supports;
    ``residual_proxies`` ((kind, rank, seed) each): also fit the residual statistics of those proxies (a second
    pass over the same windows, since the proxies come from the first pass's query/key moments)."""
    from ..capture.run import n_heads_of, n_layers_of, stream_attention
    from ..distributed import all_reduce_sum_, current_info, require_work_per_rank

    if windows.dim() != 2:
        raise ShapeError(f"windows must be (M, seq_len), got {tuple(windows.shape)}")
    layers = check_layers(layers, n_layers_of(model))
    heads = check_heads(heads, n_heads_of(model))
    info = current_info()  # under torchrun: this rank's windows, float64 sums all-reduced
    require_work_per_rank(int(windows.shape[0]), info, "--n-fit")
    mine = windows[info.rank::info.world_size]
    col = FitCollector(layers, heads, windows.shape[1], chunk_rows=chunk_rows)
    t0 = time.perf_counter()
    stream_attention(model, mine, col, layers, batch_size, desc="reconstruct fit", show_progress=progress)
    all_reduce_sum_([col.t[k] for k in sorted(col.t)], info)
    name = model_name or getattr(model, "name", type(model).__name__)
    meta = {"model": name, "seq_len": int(windows.shape[1]), "layers": layers, "heads": heads, "d_head": col.d_head,
            "n_sequences": int(windows.shape[0]), "source": "windows", "seconds": round(time.perf_counter() - t0, 3)}
    fit = ReconstructionFit(col.t, meta)
    proxies = list(dict.fromkeys((str(k), int(r), int(s)) for k, r, s in residual_proxies))
    if proxies:
        res = ResidualCollector(fit, proxies)
        stream_attention(model, mine, res, layers, batch_size, desc="reconstruct residual fit",
                         show_progress=progress)
        if info.enabled:
            for key in sorted(res.cov):
                res.cov[key].all_reduce()
            all_reduce_sum_([res.pos[k] for k in sorted(res.pos)], info)
        fit.t.update(res.tensors())
        fit.meta["residual_proxies"] = [list(p) for p in proxies]
        fit.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return fit


def fit_corpus(model: str | HFModel = "minilm", n_sequences: int = 256, seq_len: int = 128, layers=None, heads=None,
               batch_size: int = 8, corpus: Optional[str] = None, seed: int = 0, progress: bool = False,
               residual_proxies: Sequence[ProxySpec] = ()) -> ReconstructionFit:
    """Fit on ``n_sequences`` windows of the corpus' *fit* split (never the held-out documents);
    ``residual_proxies`` as in :func:`fit_from_windows`."""
    hf = load_checked(model, seq_len) if isinstance(model, str) else model
    if n_sequences < 2:
        raise ConfigError(f"--n-fit must be >= 2 (got {n_sequences})")
    windows = windows_for(hf.tokenizer, seq_len, n_sequences, "fit", corpus, seed)
    fit = fit_from_windows(hf, windows, layers, heads, batch_size, model_name=model if isinstance(model, str) else hf.name,
                           progress=progress, residual_proxies=residual_proxies)
    fit.meta.update({"split": "fit", "corpus": corpus or "stdlib", "seed": seed})
    return fit


def fit_from_spectrum(run_dir: str | Path) -> ReconstructionFit:
    """Row statistics from a finished ``attnlab spectrum`` run (no per-position sums, no query/key moments)."""
    from ..spectral.files import TENSORS

    run = RunDir(run_dir, create=False)
    tensors, meta = read_tensors(run.file(TENSORS))
    sec = run.section("spectrum") or {}
    n_rows = sec.get("n_rows", {})
    out: dict[str, torch.Tensor] = {}
    layers, heads = set(), set()
    for name, mean in tensors.items():
        if not name.startswith("rows.mean."):
            continue
        l, h = (int(v) for v in name.split(".")[2:4])
        cov = tensors[f"rows.cov.{l}.{h}"].double()
        n = float(n_rows.get(f"{l}.{h}", 0) or 0)
        if n < 2:
            raise ResultsError(f"{run.path}: spectrum results lack row counts for {l}.{h}; re-run attnlab spectrum")
        mean = mean.double()
        out[f"sxx.{l}.{h}"] = (n - 1) * cov + n * torch.outer(mean, mean)
        out[f"sxt.{l}.{h}"] = n * mean
        out[f"nq.{l}.{h}"] = torch.tensor([n], dtype=torch.float64)
        layers.add(l)
        heads.add(h)
    if not out:
        raise ResultsError(f"{run.file(TENSORS)}: no per-head row statistics (is this a spectrum run?)")
    conf = sec.get("config") or {}
    return ReconstructionFit(out, {"model": meta.get("model"), "seq_len": int(meta["seq_len"]), "layers": sorted(layers),
                                   "heads": sorted(heads), "d_head": None, "source": f"spectrum:{run.path}",
                                   "split": conf.get("split"), "corpus": conf.get("corpus")})


def check_no_leak(fit: ReconstructionFit, corpus: Optional[str], flag: str = "--spectrum") -> None:
    """Refuse statistics fitted on windows that the evaluation holds out: a spectrum run on split 'heldout' or
    'all' of the corpus being evaluated (or of unknown split) would score the method on its own training data."""
    split = fit.meta.get("split")
    same = (fit.meta.get("corpus") or None) == (corpus or None)
    if same and split != "fit":
        raise ConfigError(f"{flag} {fit.meta.get('source', '')[9:]}: its statistics were fitted on split "
                          f"{split or 'unknown'!r} of the corpus this run evaluates on its held-out split (a data "
                          f"leak); re-run attnlab spectrum with --split fit")
