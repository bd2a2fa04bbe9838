"""Sink that turns attention calls into streaming spectral statistics per (layer, head)."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..attention import AttentionCall
from ..errors import NumericalError, ShapeError
from .spread import SPREAD_MAX_BYTES, groups_bytes
from .stats import StreamingSketch, StreamingCovariance, row_centre

# Longest window for which a second row statistic over every other batch is kept (the noise floor of
# `compare`: overlap between two halves of the same corpus); G x N^2 doubles, so bounded.
HALF_MAX_N = 1024


def minus(total: StreamingCovariance, part: StreamingCovariance) -> StreamingCovariance:
    """The statistic of the samples in ``total`` that are not in ``part`` (inverse of merge)."""
    out = StreamingCovariance(total.dim, total.diag_only, total.mean.device, total.groups)
    n_b = total.n - part.n
    if n_b <= 0:
        return out
    mean_b = (total.mean * total.n - part.mean * part.n) / n_b
    delta = part.mean - mean_b
    outer = delta * delta if total.diag_only else delta.unsqueeze(-1) * delta.unsqueeze(-2)
    out.n, out.mean, out.m2 = n_b, mean_b, total.m2 - part.m2 - outer * (part.n * n_b / total.n)
    return out


class SpectrumCollector:
    """Row covariance (N x N) and, optionally, whole-matrix statistics (N^2) for every (layer, head).

    Whole matrices: with ``full_exact`` (the number of matrices expected, > 0) every row-centred matrix is kept
    (float32) and the spectrum is computed exactly from the Gram matrix of the samples (M x M: exact whenever
    M < N^2, which is the usual case); otherwise a streaming sketch of ``sketch_size`` rows gives lower bounds.

    Rows are score rows of one query over all keys, centred over their valid keys; rows of queries
    that see no key are skipped. Statistics of one layer's heads are grouped and updated in one
    batched step. ``head_chunk`` heads are scored at a time, so peak memory is B x head_chunk x N^2
    whatever the number of layers and heads.

    ``window_group`` (the group of each of this process's windows, in order, see
    :func:`attnlab.spectral.spread.window_groups`) keeps one row statistic per group of windows as well, for
    the intervals of the ranks (skipped, with a warning, when they would take more than ``SPREAD_MAX_BYTES``).
    """

    def __init__(self, layers: Sequence[int], heads: Sequence[int], seq_len: int, sketch_size: int = 16,
                 head_chunk: int = 4, centre_rows: bool = True, device: str | torch.device = "cpu",
                 full_exact: bool = False, spread_groups: int = 0, window_group: Optional[torch.Tensor] = None):
        self.layers, self.heads, self.seq_len = list(layers), list(heads), seq_len
        self.full_exact = bool(full_exact)
        self.sketch_size = 0 if self.full_exact else sketch_size
        self.head_chunk, self.centre_rows = head_chunk, centre_rows
        self.device = device
        G, N = len(self.heads), seq_len
        self.rows = {l: StreamingCovariance(N, device=device, groups=G) for l in self.layers}
        self.full_diag = {l: StreamingCovariance(N * N, True, device, G) for l in self.layers} \
            if self.sketch_size else {}
        self.full_sketch = {l: StreamingSketch(N * N, self.sketch_size, device, G) for l in self.layers} \
            if self.sketch_size else {}
        self.full_samples: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers} if self.full_exact else {}
        # rows of every other batch (batches 0, 2, 4, ... of each layer): the first half of a two-way split
        self.rows_half = {l: StreamingCovariance(N, device=device, groups=G) for l in self.layers} \
            if N <= HALF_MAX_N else {}
        self.calls = {l: 0 for l in self.layers}
        self.window_group = window_group
        self.spread_groups = spread_groups if window_group is not None else 0
        self.seen = {l: 0 for l in self.layers}  # windows of this process seen per layer (their groups)
        self.group_rows = self._make_groups(spread_groups, window_group)

    def _make_groups(self, n: int, window_group: Optional[torch.Tensor]) -> dict[int, list[StreamingCovariance]]:
        """Per layer, one row statistic (heads grouped) per group of windows; {} when off or too large."""
        if not n or window_group is None:
            return {}
        size = groups_bytes(n, len(self.layers), len(self.heads), self.seq_len)
        if size > SPREAD_MAX_BYTES:
            logging.getLogger("attnlab.spectral").warning(
                "--spread-groups %d would keep %.1f GiB of row statistics (limit %.0f GiB): no interval for the "
                "ranks; use fewer groups", n, size / 2**30, SPREAD_MAX_BYTES / 2**30)
            return {}
        G = len(self.heads)
        return {l: [StreamingCovariance(self.seq_len, device=self.device, groups=G) for _ in range(n)]
                for l in self.layers}

    def _update_groups(self, layer: int, rows: torch.Tensor, row_ok: Optional[torch.Tensor], B: int) -> None:
        """Add the rows (G, R, N) of the next ``B`` windows to their groups' statistics."""
        start = self.seen[layer]
        ids = self.window_group[start:start + B]
        if len(ids) != B:
            raise ShapeError(f"more windows than the {len(self.window_group)} the window groups were set up for")
        self.seen[layer] = start + B
        counts = torch.full((B,), self.seq_len) if row_ok is None else row_ok.sum(1).cpu()
        per_row = torch.repeat_interleave(ids, counts).to(rows.device)
        for g in ids.unique().tolist():
            self.group_rows[layer][g].update(rows[:, per_row == g])

    def __call__(self, call: AttentionCall) -> None:
        if call.layer not in self.rows:
            return
        B, Nq, Nk = call.query.shape[0], call.query.shape[2], call.key.shape[2]
        if Nq != self.seq_len or Nk != self.seq_len:
            raise ShapeError(f"attention is {Nq}x{Nk} but the statistics were set up for --seq-len {self.seq_len}")
        valid = call.valid
        row_ok = None if valid is None else valid.any(-1)[:, 0].expand(B, Nq)  # (B, Nq): queries that see some key
        rows, flats = [], []
        for start in range(0, len(self.heads), self.head_chunk):
            hs = self.heads[start:start + self.head_chunk]
            scores = call.scores(torch.tensor(hs, device=call.query.device))  # (B, h, N, N)
            bad = ~torch.isfinite(scores) if valid is None else ~(torch.isfinite(scores) | ~valid.expand_as(scores))
            if bad.any():
                raise NumericalError(f"NaN or inf in attention scores of layer {call.layer} (heads {hs})")
            s = row_centre(scores, valid) if self.centre_rows else torch.where(torch.isfinite(scores), scores, 0.0)
            s = s.transpose(0, 1)  # (h, B, N, N)
            rows.append(s.reshape(len(hs), B * Nq, Nk) if row_ok is None else s[:, row_ok])
            if self.sketch_size or self.full_exact:
                flats.append(s.reshape(len(hs), B, Nq * Nk))
        rows_all = torch.cat(rows)
        self.rows[call.layer].update(rows_all)
        if self.rows_half and self.calls[call.layer] % 2 == 0:
            self.rows_half[call.layer].update(rows_all)
        self.calls[call.layer] += 1
        if self.group_rows:
            self._update_groups(call.layer, rows_all, row_ok, B)
        if self.full_exact:
            self.full_samples[call.layer].append(torch.cat(flats).float().cpu())  # (G, B, N^2)
        elif self.sketch_size:
            flat = torch.cat(flats)
            self.full_diag[call.layer].update(flat)
            self.full_sketch[call.layer].update(flat)

    def head_rows(self, layer: int, head: int) -> StreamingCovariance:
        """Row statistic of one (layer, head)."""
        return self.rows[layer].group(self.heads.index(head))

    def half_split(self, layer: int, head: int) -> tuple[StreamingCovariance, StreamingCovariance] | None:
        """Row statistics of (even batches, odd batches) of one (layer, head), or None if not kept / too few."""
        if not self.rows_half:
            return None
        g = self.heads.index(head)
        a = self.rows_half[layer].group(g)
        b = minus(self.rows[layer], self.rows_half[layer]).group(g)
        return (a, b) if min(a.n, b.n) > 1 else None

    def head_full(self, layer: int, head: int) -> tuple[StreamingCovariance, torch.Tensor]:
        """Full-matrix diagonal statistic and sketch of one (layer, head)."""
        g = self.heads.index(head)
        return self.full_diag[layer].group(g), self.full_sketch[layer].sketch()[g]

    def full_matrices(self, layer: int) -> torch.Tensor:
        """Every kept row-centred whole matrix of ``layer``, flattened: (G, M, N^2) float32 (exact mode)."""
        parts = self.full_samples[layer]
        return torch.cat(parts, 1) if parts else torch.zeros(len(self.heads), 0, self.seq_len ** 2)

    # --- persistence and distribution -------------------------------------------------------------
    def cpu(self) -> "SpectrumCollector":
        """Move every statistic to the CPU (before the eigen analysis)."""
        groups = [st for per in self.group_rows.values() for st in per]
        for st in list(self.rows.values()) + list(self.full_diag.values()) + list(self.rows_half.values()) + groups:
            st.to("cpu")
        for fd in self.full_sketch.values():
            fd.buf = fd.buf.cpu()
        self.device = "cpu"
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """All statistics as named tensors (for safetensors checkpoints)."""
        out: dict[str, torch.Tensor] = {}
        for l in self.layers:
            out.update(self.rows[l].state(f"rows.{l}."))
            if self.rows_half:
                out.update(self.rows_half[l].state(f"half.{l}."))
                out[f"half.calls.{l}"] = torch.tensor([self.calls[l]], dtype=torch.int64)
            if self.group_rows:
                for g, st in enumerate(self.group_rows[l]):
                    out.update(st.state(f"groups.{l}.{g}."))
                out[f"groups.seen.{l}"] = torch.tensor([self.seen[l]], dtype=torch.int64)
            if self.sketch_size:
                out.update(self.full_diag[l].state(f"full.{l}."))
                out[f"sketch.{l}"] = self.full_sketch[l].buf.cpu().clone()
            if self.full_exact:
                out[f"fullx.{l}"] = self.full_matrices(l).clone()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state` (resume)."""
        G = len(self.heads)
        for l in self.layers:
            self.rows[l] = StreamingCovariance.from_state(tensors, f"rows.{l}.", G).to(self.device)
            if self.rows_half and f"half.{l}.n" in tensors:
                self.rows_half[l] = StreamingCovariance.from_state(tensors, f"half.{l}.", G).to(self.device)
                self.calls[l] = int(tensors[f"half.calls.{l}"].item())
            elif self.rows_half:  # a checkpoint without the split: no noise floor for this run
                self.rows_half = {}
            if self.group_rows and f"groups.seen.{l}" in tensors:
                self.group_rows[l] = [StreamingCovariance.from_state(tensors, f"groups.{l}.{g}.", G).to(self.device)
                                      for g in range(len(self.group_rows[l]))]
                self.seen[l] = int(tensors[f"groups.seen.{l}"].item())
            elif self.group_rows:  # a checkpoint without window groups (older version): no interval
                self.group_rows = {}
            if self.sketch_size:
                self.full_diag[l] = StreamingCovariance.from_state(tensors, f"full.{l}.", G).to(self.device)
                self.full_sketch[l].buf = tensors[f"sketch.{l}"].double().to(self.device)
            if self.full_exact:
                self.full_samples[l] = [tensors[f"fullx.{l}"].float()]

    def all_reduce(self) -> None:
        """Merge statistics across ranks (covariances by all-reduce, sketches by all-gather + merge)."""
        import torch.distributed as dist

        for l in self.layers:
            self.rows[l].all_reduce()
            if self.rows_half:
                self.rows_half[l].all_reduce()
            for st in self.group_rows.get(l, []):
                st.all_reduce()
            if not self.sketch_size:
                continue
            self.full_diag[l].all_reduce()
            mine = self.full_sketch[l].sketch()  # (G, <=ell, D)
            pad = torch.zeros(mine.shape[0], self.sketch_size, mine.shape[2], dtype=torch.float64, device=mine.device)
            pad[:, : mine.shape[1]] = mine
            gathered = [torch.zeros_like(pad) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, pad)
            self.full_sketch[l].buf = torch.cat(gathered, dim=1)
            self.full_sketch[l]._shrink()
