"""Sink that turns attention calls into streaming spectral statistics per (layer, head)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..attention import AttentionCall
from ..errors import NumericalError, ShapeError
from .stats import StreamingSketch, StreamingCovariance, row_centre


class SpectrumCollector:
    """Row covariance (N x N) and, optionally, a full-matrix sketch (N^2) for every (layer, head).

    Rows are score rows of one query over all keys, centred over their valid keys; rows of queries
    that see no key are skipped. Statistics of one layer's heads are grouped and updated in one
    batched step. ``head_chunk`` heads are scored at a time, so peak memory is B x head_chunk x N^2
    whatever the number of layers and heads.
    """

    def __init__(self, layers: Sequence[int], heads: Sequence[int], seq_len: int, sketch_size: int = 16,
                 head_chunk: int = 4, centre_rows: bool = True, device: str | torch.device = "cpu"):
        self.layers, self.heads, self.seq_len = list(layers), list(heads), seq_len
        self.sketch_size, self.head_chunk, self.centre_rows = sketch_size, head_chunk, centre_rows
        self.device = device
        G, N = len(self.heads), seq_len
        self.rows = {l: StreamingCovariance(N, device=device, groups=G) for l in self.layers}
        self.full_diag = {l: StreamingCovariance(N * N, True, device, G) for l in self.layers} if sketch_size else {}
        self.full_sketch = {l: StreamingSketch(N * N, sketch_size, device, G) for l in self.layers} \
            if sketch_size else {}

    def __call__(self, call: AttentionCall) -> None:
        if call.layer not in self.rows:
            return
        B, Nq, Nk = call.query.shape[0], call.query.shape[2], call.key.shape[2]
        if Nq != self.seq_len or Nk != self.seq_len:
            raise ShapeError(f"attention is {Nq}x{Nk} but the statistics were set up for --seq-len {self.seq_len}")
        valid = call.valid
        row_ok = None if valid is None else valid.any(-1)[:, 0]  # (B, Nq): queries that see some key
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
            if self.sketch_size:
                flats.append(s.reshape(len(hs), B, Nq * Nk))
        self.rows[call.layer].update(torch.cat(rows))
        if self.sketch_size:
            flat = torch.cat(flats)
            self.full_diag[call.layer].update(flat)
            self.full_sketch[call.layer].update(flat)

    def head_rows(self, layer: int, head: int) -> StreamingCovariance:
        """Row statistic of one (layer, head)."""
        return self.rows[layer].group(self.heads.index(head))

    def head_full(self, layer: int, head: int) -> tuple[StreamingCovariance, torch.Tensor]:
        """Full-matrix diagonal statistic and sketch of one (layer, head)."""
        g = self.heads.index(head)
        return self.full_diag[layer].group(g), self.full_sketch[layer].sketch()[g]

    # --- persistence and distribution -------------------------------------------------------------
    def cpu(self) -> "SpectrumCollector":
        """Move every statistic to the CPU (before the eigen analysis)."""
        for st in list(self.rows.values()) + list(self.full_diag.values()):
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
            if self.sketch_size:
                out.update(self.full_diag[l].state(f"full.{l}."))
                out[f"sketch.{l}"] = self.full_sketch[l].buf.cpu().clone()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state` (resume)."""
        G = len(self.heads)
        for l in self.layers:
            self.rows[l] = StreamingCovariance.from_state(tensors, f"rows.{l}.", G).to(self.device)
            if self.sketch_size:
                self.full_diag[l] = StreamingCovariance.from_state(tensors, f"full.{l}.", G).to(self.device)
                self.full_sketch[l].buf = tensors[f"sketch.{l}"].double().to(self.device)

    def all_reduce(self) -> None:
        """Merge statistics across ranks (covariances by all-reduce, sketches by all-gather + merge)."""
        import torch.distributed as dist

        for l in self.layers:
            self.rows[l].all_reduce()
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
