"""Data-parallel fitting of learned predictors over round-robin sharded windows (torchrun; identities in one process).

Every rank holds the windows of a :class:`~attnlab.distributed.WindowShard` and ends with the same predictor state:

* minibatches are global: the same shuffled units of consecutive global windows on every rank (one generator
  seeded alike; :data:`UNIT` balances the ranks' shares of every batch); each rank computes the loss SUM over its
  own windows of the batch, the gradient sums and row counts are all-reduced (float64) and divided by the global
  count before ``opt.step()`` (a rank without a window in the batch contributes zeros); training runs in float64
  so that the merge order changes nothing visible;
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


#: Windows ``UNIT*j .. UNIT*j + UNIT-1`` always share a minibatch (units are shuffled every epoch). With round-robin
#: ownership every rank of a 1-, 2- or 4-process run then holds the same share of each batch, so no rank waits for
#: another at the per-step all-reduce; the batches do not depend on the number of processes.
UNIT = 4


def global_batches(n: int, batch_size: int, g: torch.Generator, unit: int = UNIT) -> list[list[int]]:
    """One epoch's minibatches of global window indices: shuffled units of ``unit`` consecutive windows, cut into
    batches of ``batch_size`` (the same on every rank and for any number of ranks)."""
    units = torch.randperm(-(-n // unit), generator=g).tolist()
    order = [i for u in units for i in range(u * unit, min((u + 1) * unit, n))]
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def fit_minibatches(params: Sequence[Tensor], opt: torch.optim.Optimizer, shard: WindowShard, epochs: int,
                    batch_size: int, g: torch.Generator,
                    batch_loss: Callable[[list[int], list[int], int], tuple[Optional[Tensor], int]]) -> list[float]:
    """Adam (or any ``opt``) on global minibatches of windows; returns the mean loss per epoch.

    ``batch_loss(local, global_, epoch)`` gets this rank's windows of the batch (local positions and their global
    indices) and returns (loss SUM over its rows, number of rows) or (None, 0). The step uses the gradient of the
    global sum divided by the global row count (the mean over every rank's rows); batches without a row anywhere
    are skipped on every rank."""
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0.0
        for idx in global_batches(shard.n, batch_size, g):
            local, glob = shard.mine(idx)
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
