"""Fixed-pattern baselines the Sparsefinder paper compares with: Longformer and OpenAI's Sparse Transformer.

* ``longformer``: sliding window |i - j| <= window plus global tokens (each attends to every key and is
  attended by every query). Globals: the first and the last token ([CLS] and [SEP] of an encoder window), the
  task-level choice of Longformer (the public Sparsefinder code draws 2-4 random globals instead).
* ``strided``: Child et al. (2019). ``mode="strided"``: local |i - j| < stride, or (i - j) divisible by the
  stride. ``mode="fixed"``: same block of ``stride`` tokens, or a key among the last ``expressivity`` positions
  of a block ("summary" columns), the variant the public Sparsefinder code simulates.

Both are input independent (no predictor cost); the causal mask is applied by ``restrict``. Knob: ``window``
resp. ``stride``.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from .base import BasePredictor, int_grid
from .baselines import band


class LongformerPredictor(BasePredictor):
    """Window + global first/last tokens. Knob: ``window``."""

    name = "longformer"
    knob = "window"

    def __init__(self, window: int = 4, n_global_first: int = 1, n_global_last: int = 1):
        super().__init__()
        self.window, self.n_global_first, self.n_global_last = window, n_global_first, n_global_last
        self._check()

    def _check(self) -> None:
        if int(self.window) < 0 or self.n_global_first < 0 or self.n_global_last < 0:
            raise ConfigError(f"longformer: --window and the global-token counts must be >= 0 (got {self.window}, "
                              f"{self.n_global_first}, {self.n_global_last})")

    def global_positions(self, n: int) -> list[int]:
        """Positions of the global tokens in a sequence of n."""
        first = list(range(min(self.n_global_first, n)))
        last = list(range(max(n - self.n_global_last, 0), n))
        return sorted(set(first + last))

    def _predict(self, q, k, valid):
        B, H, nq, _ = q.shape
        nk = k.shape[2]
        g = band(nq, nk, int(self.window), q.device)
        glob = torch.tensor(self.global_positions(nk), dtype=torch.long, device=q.device)
        g[:, glob] = True
        g[glob[glob < nq], :] = True
        return g.expand(B, H, -1, -1).clone()

    def grid(self, n: int) -> list:
        return int_grid(n, [48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1, 0])


class StridedPredictor(BasePredictor):
    """OpenAI Sparse Transformer pattern (strided or fixed). Knob: ``stride``."""

    name = "strided"
    knob = "stride"

    def __init__(self, stride: int = 8, mode: str = "strided", expressivity: int = 2):
        super().__init__()
        self.stride, self.mode, self.expressivity = stride, mode, expressivity
        self._check()

    def _check(self) -> None:
        if int(self.stride) < 1:
            raise ConfigError(f"strided: --stride must be >= 1 (got {self.stride})")
        if self.mode not in ("strided", "fixed"):
            raise ConfigError(f"strided: mode must be strided or fixed (got {self.mode!r})")
        if not 0 <= self.expressivity:
            raise ConfigError(f"strided: expressivity must be >= 0 (got {self.expressivity})")

    def pattern(self, nq: int, nk: int, device=None) -> torch.Tensor:
        """The (nq, nk) boolean pattern."""
        l = int(self.stride)
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        if self.mode == "strided":
            return ((i - j).abs() < l) | ((i - j) % l == 0)
        c = min(self.expressivity, l)
        return (i // l == j // l) | ((j % l) >= l - c)

    def _predict(self, q, k, valid):
        return self.pattern(q.shape[2], k.shape[2], q.device).expand(q.shape[0], q.shape[1], -1, -1).clone()

    def grid(self, n: int) -> list:
        if self.mode == "strided":  # stride >= n: local window covers everything
            return int_grid(n, [64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2])
        return int_grid(n, [64, 48, 32, 24, 16, 12, 8, 6, 4, 3])
