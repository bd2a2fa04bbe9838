"""Data-parallel fitting of learned predictors over round-robin sharded windows (torchrun; identities in one process).

Every rank holds the windows of a :class:`~attnlab.distributed.WindowShard` and ends with the same predictor state:

* minibatches are global: the same permutation of global window indices on every rank (one generator seeded
  alike); each rank computes the loss SUM over its own windows of the batch, the gradient sums and row counts are
  all-reduced (float64) and divided by the global count before ``opt.step()`` (a rank without a window in the
  batch contributes zeros); training runs in float64 so that the merge order changes nothing visible;
* random draws that touch data (pair sampling, subsampled pools) come from generators seeded per
  (seed, purpose, epoch, global window), so they do not depend on the sharding;
* global statistics (standard deviations, covariances, densities) are float64 sums all-reduced;
* subsampled pools (calibration samples, k-means points) take at most ``total // n_windows`` entries per window
  and are gathered in global window order to every rank.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ...distributed import WindowShard, per_window_cap, window_generator

# purposes of the per-window generators (so that two draws of one window never share a stream)
PAIRS, CALIB, KEYS, POINTS = 1, 2, 3, 4


def shard_of(shard: Optional[WindowShard], n_local: int) -> WindowShard:
    """``shard``, or every window in this process; checks that it matches the local window count."""
    shard = shard or WindowShard.single(n_local)
    if shard.n_local != n_local:
        raise ValueError(f"{n_local} local windows, but the shard holds {shard.n_local} of {shard.n}")
    return shard


def head_std(shard: WindowShard, x: Tensor) -> Tensor:
    """Standard deviation per head (H,) of x (B_local, H, ...) over every window of the shard (two-pass, float64,
    Bessel-corrected as ``torch.std``)."""
    H = x.shape[1]
    xs = x.transpose(0, 1).reshape(H, -1).double()
    s = torch.cat([xs.sum(1), torch.tensor([float(xs.shape[1])], dtype=torch.float64)])
    shard.sum_([s])
    mean, count = s[:H] / s[H].clamp(min=1), s[H]
    ss = (xs - mean[:, None]).pow(2).sum(1)
    shard.sum_([ss])
    return (ss / (count - 1).clamp(min=1)).sqrt()


def global_sum(shard: WindowShard, *tensors: Tensor) -> list[Tensor]:
    """float64 copies of ``tensors`` summed over ranks."""
    out = [t.double().clone() for t in tensors]
    shard.sum_(out)
    return out


def pooled_sample(shard: WindowShard, per_window: Sequence[Tensor], total: int, seed: int, purpose: int,
                  dim: int = -1) -> Tensor:
    """At most ``total // n_windows`` entries along ``dim`` of each local window's tensor (all entries if fewer;
    a seeded choice per (seed, purpose, global window), the same for every other index), gathered in global
    window order and concatenated along ``dim`` on every rank."""
    cap = per_window_cap(total, shard.n)
    picked = []
    for t, gidx in zip(per_window, shard.indices):
        m = t.shape[dim]
        if m > cap:
            sel = torch.randperm(m, generator=window_generator(seed, purpose, gidx))[:cap].sort().values
            t = t.index_select(dim, sel)
        picked.append(t.contiguous())
    return torch.cat(shard.gather(picked), dim=dim)


def fit_minibatches(params: Sequence[Tensor], opt: torch.optim.Optimizer, shard: WindowShard, epochs: int,
                    batch_size: int, g: torch.Generator,
                    batch_loss: Callable[[list[int], list[int], int], tuple[Optional[Tensor], int]]) -> list[float]:
    """Adam (or any ``opt``) on global minibatches of windows; returns the mean loss per epoch.

    ``batch_loss(local, global_, epoch)`` gets this rank's windows of the batch (local positions and their global
    indices) and returns (loss SUM over its rows, number of rows) or (None, 0). The step uses the gradient of the
    global sum divided by the global row count (the mean over every rank's rows); batches without a row anywhere
    are skipped on every rank."""
    world, rank = shard.info.world_size, shard.info.rank
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0.0
        for idx in torch.randperm(shard.n, generator=g).split(batch_size):
            glob = [int(i) for i in idx if int(i) % world == rank]
            local = [i // world for i in glob]
            for p in params:
                p.grad = None
            loss, rows = batch_loss(local, glob, epoch) if local else (None, 0)
            if loss is not None and rows > 0:
                loss.backward()
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                              for p in params]
                             + [torch.tensor([float(rows), float(loss.detach()) if loss is not None and rows else 0.0],
                                             dtype=torch.float64)])
            shard.sum_([flat])
            n_rows = float(flat[-2])
            if n_rows == 0:
                continue
            off = 0
            for p in params:
                p.grad = (flat[off:off + p.numel()] / n_rows).view_as(p).to(p.dtype)
                off += p.numel()
            opt.step()
            total, count = total + float(flat[-1]), count + n_rows
        history.append(total / max(count, 1.0))
    return history
