"""Turn collected statistics into spectra, ranks-for-variance, bases and overlap matrices."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .collector import SpectrumCollector
from .spread import rank_spread
from .eigen import LEVELS, eigh_desc, explained_variance, overlap_matrix, ranks_for
from .stats import gram_covariance, pooled_within, sketch_covariance_eig


def summarise(col: SpectrumCollector, basis_k: Optional[int] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Eigen analysis of every statistic; returns (JSON results, tensors to save).

    Per (layer, head): row eigenvalues, explained-variance curve, k90/k95/k99; per layer: the same
    for the heads pooled with equal weight (:func:`pooled_within`); overall: every (layer, head) pooled.
    Bases for overlap use ``basis_k`` eigenvectors (default: N/8). Full-matrix results come from the
    sketch and the exact total variance.
    """
    L, H = col.layers, col.heads
    res: dict[str, Any] = {"layers": L, "heads": H, "seq_len": col.seq_len, "levels": list(LEVELS)}
    tensors: dict[str, torch.Tensor] = {}
    head_curves, head_ranks, head_bases = {}, {}, {}
    head_stats = {(l, h): col.head_rows(l, h) for l in L for h in H}
    for (l, h), st in head_stats.items():
        evals, evecs = eigh_desc(st.covariance())
        curve = explained_variance(evals)
        head_curves[(l, h)], head_ranks[(l, h)] = curve, ranks_for(curve)
        head_bases[(l, h)] = evecs
        tensors[f"rows.eigvals.{l}.{h}"] = evals
        tensors[f"rows.mean.{l}.{h}"] = st.mean
        tensors[f"rows.cov.{l}.{h}"] = st.covariance()
    res["n_rows"] = {f"{l}.{h}": st.n for (l, h), st in head_stats.items()}
    layer_covs = {l: pooled_within([head_stats[(l, h)] for h in H]) for l in L}
    ov_evals, ov_vecs = eigh_desc(pooled_within(list(head_stats.values())))
    ov_curve = explained_variance(ov_evals)
    # A fixed basis size N/8 keeps overlaps comparable across layers and models and well above chance
    # (k/N); k90 would often be most of N here, where any two subspaces overlap.
    k = max(1, min(basis_k or col.seq_len // 8, col.seq_len))
    res["basis_k"] = k
    res["pooled"] = {"curve": ov_curve.tolist(), **ranks_for(ov_curve)}
    tensors["rows.basis.pooled"] = ov_vecs[:, :k]
    layer_bases = {}
    res["per_layer"] = {}
    for l, cov in layer_covs.items():
        evals, evecs = eigh_desc(cov)
        curve = explained_variance(evals)
        layer_bases[l] = evecs[:, :k]
        tensors[f"rows.basis.layer.{l}"] = layer_bases[l]
        res["per_layer"][str(l)] = {"curve": curve.tolist(), **ranks_for(curve)}
    res["per_head"] = {
        f"{l}.{h}": {"curve": head_curves[(l, h)].tolist(), **head_ranks[(l, h)]} for (l, h) in head_stats}
    for (l, h), vecs in head_bases.items():
        tensors[f"rows.basis.{l}.{h}"] = vecs[:, :k]
    res["overlap_layers"] = overlap_matrix([layer_bases[l] for l in L]).tolist()
    res["noise_floor"] = noise_floor(col, k)
    res["overlap_heads"] = {str(l): overlap_matrix([head_bases[(l, h)][:, :k] for h in H]).tolist() for l in L}
    # Chance level: expected overlap of two random k-dim subspaces of R^N is k/N.
    res["overlap_chance"] = k / col.seq_len
    if col.full_exact:
        res["full_matrix"], res["full_matrix_layers"] = full_exact_spectra(col, tensors)
    elif col.sketch_size:
        res["full_matrix"] = {}
        for (l, h) in head_stats:
            diag, sketch = col.head_full(l, h)
            total = float(diag.covariance().sum())
            evals, _ = sketch_covariance_eig(sketch, diag.mean, diag.n, col.sketch_size)
            curve = explained_variance(evals, total)
            ranks = ranks_for(curve)
            res["full_matrix"][f"{l}.{h}"] = {
                "curve": curve.tolist(), "total_variance": total, **ranks, "method": "sketch",
                "n_matrices": diag.n, "sketch_size": col.sketch_size, "limit": col.sketch_size,
                "reached": {k_: v <= col.sketch_size for k_, v in ranks.items()}}
            tensors[f"full.eigvals.{l}.{h}"] = evals
    res["k90_grid"] = [[head_ranks[(l, h)]["k90"] for h in H] for l in L]
    if col.spread_groups:  # asked for (--spread-groups > 0): the interval, or why there is none
        res["rank_interval"] = rank_spread(col.rows, col.group_rows)
    return res, tensors


def noise_floor(col: SpectrumCollector, k: int) -> dict[str, Any] | None:
    """Same-layer eigenspace overlap between two halves of the windows (even vs odd batches), per layer.

    Two runs on the same corpus can't agree better than this; `compare` quotes it as its noise floor.
    None when the collector kept no split (long windows) or a half has too few rows.
    """
    diag, k90_layers, every = [], {}, []
    for l in col.layers:
        halves = [col.half_split(l, h) for h in col.heads]
        if any(x is None for x in halves):
            return None
        every += halves
        bases, k90s = [], []
        for side in (0, 1):
            evals, vecs = eigh_desc(pooled_within([x[side] for x in halves]))
            bases.append(vecs[:, :k])
            k90s.append(ranks_for(explained_variance(evals))["k90"])
        diag.append(float(overlap_matrix([bases[0]], [bases[1]])[0, 0]))
        k90_layers[str(l)] = k90s
    # k90 of each half: the spread of k90 across windows (each half has half the rows, and k90 grows with them)
    pooled = [ranks_for(explained_variance(eigh_desc(pooled_within([x[side] for x in every]))[0]))["k90"]
              for side in (0, 1)]
    return {"diagonal": diag, "layers": list(col.layers), "k": k, "split": "even vs odd batches of windows",
            "k90_halves": {"pooled": pooled, "per_layer": k90_layers}}


def full_exact_spectra(col: SpectrumCollector, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Exact whole-matrix spectra from the kept samples: per (layer, head), and per layer with the heads' matrices
    concatenated (one sample = the layer's whole score tensor; its Gram matrix is the sum of the heads')."""
    per_head, per_layer = {}, {}
    for l in col.layers:
        x = col.full_matrices(l)  # (G, M, N^2)
        m = x.shape[1]
        if m < 2:
            continue
        layer_gram = torch.zeros(m, m, dtype=torch.float64)
        for g, h in enumerate(col.heads):
            gram = gram_covariance(x[g])
            layer_gram += gram
            evals = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
            curve = explained_variance(evals)
            ranks = ranks_for(curve)
            per_head[f"{l}.{h}"] = {"curve": curve.tolist(), "total_variance": float(evals.sum()), **ranks,
                                    "method": "exact", "n_matrices": m, "limit": m - 1,
                                    "reached": {k: True for k in ranks}}
            tensors[f"full.eigvals.{l}.{h}"] = evals
        evals = torch.linalg.eigvalsh(layer_gram).flip(0).clamp_min(0)
        curve = explained_variance(evals)
        per_layer[str(l)] = {"curve": curve.tolist(), "total_variance": float(evals.sum()), **ranks_for(curve),
                             "method": "exact, heads concatenated", "n_matrices": m, "limit": m - 1}
    return per_head, per_layer


def cross_overlap(bases_a: dict[int, torch.Tensor], bases_b: dict[int, torch.Tensor]) -> np.ndarray:
    """Layer x layer overlap between two models' (or runs') per-layer bases."""
    return overlap_matrix([bases_a[l] for l in sorted(bases_a)], [bases_b[l] for l in sorted(bases_b)])
