"""Sink that turns attention calls into streaming spectral statistics per (layer, head)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..capture.hf import AttentionCall
from ..errors import NumericalError, ShapeError
from .stats import FrequentDirections, StreamingCovariance, row_centre


class SpectrumCollector:
    """Row covariance (N x N) and, optionally, a full-matrix sketch (N^2) for every (layer, head).

    Rows are score rows of one query over all keys, centred over their valid keys; rows of queries
    that see no key are skipped. ``head_chunk`` heads are scored at a time, so peak memory is
    B x head_chunk x N^2 whatever the number of layers and heads.
    """

    def __init__(self, layers: Sequence[int], heads: Sequence[int], seq_len: int, sketch_size: int = 16,
                 head_chunk: int = 4, centre_rows: bool = True, device: str | torch.device = "cpu"):
        self.layers, self.heads, self.seq_len = list(layers), list(heads), seq_len
        self.sketch_size, self.head_chunk, self.centre_rows = sketch_size, head_chunk, centre_rows
        self.device = device
        self.rows = {(l, h): StreamingCovariance(seq_len, device=device) for l in self.layers for h in self.heads}
        self.full_diag = {(l, h): StreamingCovariance(seq_len * seq_len, diag_only=True, device=device)
                          for l in self.layers for h in self.heads} if sketch_size else {}
        self.full_sketch = {(l, h): FrequentDirections(seq_len * seq_len, sketch_size, device=device)
                            for l in self.layers for h in self.heads} if sketch_size else {}

    def __call__(self, call: AttentionCall) -> None:
        if call.layer not in self.layers:
            return
        B, _, Nq, Nk = call.query.shape[0], None, call.query.shape[2], call.key.shape[2]
        if Nq != self.seq_len or Nk != self.seq_len:
            raise ShapeError(f"attention is {Nq}x{Nk} but the statistics were set up for --seq-len {self.seq_len}")
        for start in range(0, len(self.heads), self.head_chunk):
            hs = self.heads[start:start + self.head_chunk]
            scores = call.scores(torch.tensor(hs, device=call.query.device))  # (B, h, N, N)
            valid = call.valid
            finite = torch.isfinite(scores) if valid is None else torch.isfinite(scores) | ~valid.expand_as(scores)
            if not finite.all():
                raise NumericalError(f"NaN or inf in attention scores of layer {call.layer} (heads {hs})")
            s = row_centre(scores, valid) if self.centre_rows else torch.where(torch.isfinite(scores), scores, 0.0)
            row_ok = torch.ones(B, 1, Nq, dtype=torch.bool, device=s.device) if valid is None else valid.any(-1)
            for j, h in enumerate(hs):
                sj = s[:, j]  # (B, N, N)
                keep = row_ok[:, 0] if row_ok.shape[1] == 1 else row_ok[:, j]
                self.rows[(call.layer, h)].update(sj[keep])
                if self.sketch_size:
                    flat = sj.reshape(B, Nq * Nk)
                    self.full_diag[(call.layer, h)].update(flat)
                    self.full_sketch[(call.layer, h)].update(flat)

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
        for (l, h), st in self.rows.items():
            out.update(st.state(f"rows.{l}.{h}."))
        for (l, h), st in self.full_diag.items():
            out.update(st.state(f"full.{l}.{h}."))
            out[f"sketch.{l}.{h}"] = self.full_sketch[(l, h)].sketch().cpu().clone()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state` (resume)."""
        for key in self.rows:
            l, h = key
            self.rows[key] = StreamingCovariance.from_state(tensors, f"rows.{l}.{h}.").to(self.device)
            if self.sketch_size:
                self.full_diag[key] = StreamingCovariance.from_state(tensors, f"full.{l}.{h}.").to(self.device)
                fd = FrequentDirections(self.seq_len * self.seq_len, self.sketch_size, device=self.device)
                fd.buf = tensors[f"sketch.{l}.{h}"].double().to(self.device)
                self.full_sketch[key] = fd

    def all_reduce(self) -> None:
        """Merge statistics across ranks (covariances by all-reduce, sketches by all-gather + merge)."""
        import torch.distributed as dist

        for key in self.rows:
            self.rows[key].all_reduce()
            if self.sketch_size:
                self.full_diag[key].all_reduce()
                mine = self.full_sketch[key].sketch()
                pad = torch.zeros(self.sketch_size, mine.shape[1], dtype=torch.float64, device=mine.device)
                pad[: mine.shape[0]] = mine
                gathered = [torch.zeros_like(pad) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, pad)
                fd = FrequentDirections(mine.shape[1], self.sketch_size, device=mine.device)
                fd.buf = torch.cat(gathered)
                fd._shrink()
                self.full_sketch[key] = fd
