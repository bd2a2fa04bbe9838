"""Vectorised training of many small models at once: the bounded-norm attention head and the MLP contrast
(the models and their norm bounds: :mod:`attnlab.variables.ensemble_models`).

One ensemble holds E independent members (each its own seed, task instance and train size m) whose
parameters carry a leading member dimension; the loss is the sum of the members' losses and Adam/SGD
are elementwise, so members never interact. Each member is initialised and batched from its own
generator, so its result does not depend on which other members share the ensemble. The bounded head's
weights are projected onto their norm bounds after each optimiser step; the MLP is trained with SGD + momentum.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .ensemble_models import BoundedHeads, Bounds, Member, MLPEnsemble, _gen  # noqa: F401 (the ensemble's names)
from .probe import relevant_mass
from .tasks import SparseBooleanTask


@dataclass
class EnsembleConfig:
    """Optimisation settings shared by every member of an ensemble run.

    No held-out data is used for training or model selection: each run is monitored on (at most
    ``n_monitor`` of) its own training examples, keeps the weights of lowest training loss, stops after
    ``patience`` evaluations without a relative improvement of 1e-3 once the loss has fallen below 0.9 x
    its first value (a run still on the initial plateau trains on), or at train accuracy 1 and loss below
    ``stop_loss``. A trial *fits* when its accuracy on all m training examples is >= ``fit_acc``; one that does
    not is retrained from a new initialisation (at the next ``lr_grid`` rate) up to ``restarts`` times, every
    attempt with the same ``max_steps`` budget; the first fitting attempt (else the lowest training loss) is
    kept. The test set (``n_test`` fresh examples) is only used to measure.
    """

    kind: str = "bounded"  # bounded | mlp
    d_model: int = 32  # width (bounded)
    n_heads: int = 1  # attention heads (bounded)
    width: int = 128  # hidden width (mlp)
    lr: float = 1e-2  # Adam (bounded) / SGD (mlp) learning rate
    momentum: float = 0.9  # SGD momentum (mlp)
    batch_size: int = 64
    max_steps: int = 1500
    eval_every: int = 50
    patience: int = 10
    stop_loss: float = 0.01  # stop early once train accuracy is 1 and train loss is below this
    restarts: int = 2  # re-initialisations of a trial that does not fit its training set (0 = one attempt)
    lr_grid: list[float] = field(default_factory=list)  # attempt k trains at lr_grid[k % len] (empty: always lr); picked on train data
    fit_acc: float = 1.0  # a trial fits its training set when its accuracy on all m training examples >= this
    n_monitor: int = 2048  # training examples the monitor evaluates
    n_test: int = 1000
    n_probe: int = 256  # bounded: test inputs on which each trial's readout attention mass on the relevant bits is measured
    bounds: Optional[Bounds] = None  # bounded kind only; None = unconstrained
    eval_chunk: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.bounds, dict):
            self.bounds = Bounds(**self.bounds)
        if self.kind not in ("bounded", "mlp"):
            raise ConfigError(f"--model must be bounded or mlp for ensemble training (got {self.kind!r})")
        for flag, v in (("--d-model", self.d_model), ("--n-heads", self.n_heads), ("--width", self.width),
                        ("--lr", self.lr), ("--batch-size", self.batch_size), ("--max-steps", self.max_steps),
                        ("--eval-every", self.eval_every), ("--patience", self.patience),
                        ("--n-test", self.n_test), ("--n-monitor", self.n_monitor)):
            if not v > 0:
                raise ConfigError(f"{flag} must be > 0 (got {v})")
        if self.n_probe < 0:
            raise ConfigError(f"--n-probe must be >= 0 (got {self.n_probe})")
        if self.restarts < 0:
            raise ConfigError(f"--restarts must be >= 0 (got {self.restarts})")
        self.lr_grid = [float(v) for v in self.lr_grid]
        if any(not (math.isfinite(v) and v > 0) for v in self.lr_grid):
            raise ConfigError(f"--lr-grid values must be finite and > 0 (got {list(self.lr_grid)})")
        if not 0 < self.fit_acc <= 1:
            raise ConfigError(f"--fit-acc must be in (0, 1] (got {self.fit_acc})")


def _stack_data(members: Sequence[Member], n_test: int, device: torch.device):
    """Per distinct seed: the train set of its largest m (smaller m are prefixes) and the test set, uint8."""
    seeds = sorted({mb.seed for mb in members})
    idx = {s: i for i, s in enumerate(seeds)}
    big = {s: max(mb.m for mb in members if mb.seed == s) for s in seeds}
    task_of = {mb.seed: mb.task for mb in members}
    N = members[0].task.seq_len
    tx = torch.zeros(len(seeds), max(big.values()), N, dtype=torch.uint8)
    ty = torch.zeros(len(seeds), max(big.values()), dtype=torch.long)
    sx, sy = [], []
    for s in seeds:
        sp = task_of[s].split(big[s], n_test)
        tx[idx[s], :big[s]] = sp.train_x.to(torch.uint8)
        ty[idx[s], :big[s]] = sp.train_y
        sx.append(sp.test_x.to(torch.uint8)), sy.append(sp.test_y)
    member_task = torch.tensor([idx[mb.seed] for mb in members])
    return tx.to(device), ty.to(device), torch.stack(sx).to(device), torch.stack(sy).to(device), member_task.to(device)


@torch.no_grad()
def _evaluate(model, x: torch.Tensor, y: torch.Tensor, member_task: torch.Tensor, n: torch.Tensor, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member (accuracy, mean loss) on the first n[e] examples of its task's set x (S, M, N), y (S, M)."""
    E = len(member_task)
    correct = torch.zeros(E, device=x.device)
    loss = torch.zeros(E, device=x.device)
    for i in range(0, int(n.max()), chunk):
        xb, yb = x[member_task, i:i + chunk], y[member_task, i:i + chunk]
        keep = (torch.arange(i, i + xb.shape[1], device=x.device)[None] < n[:, None]).float()  # (E, b)
        logits = model(model.encode(xb))
        ce = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view_as(keep)
        correct += ((logits.argmax(-1) == yb).float() * keep).sum(1)
        loss += (ce * keep).sum(1)
    return correct / n, loss / n


def train_ensemble(members: Sequence[Member], cfg: EnsembleConfig, device: str | torch.device = "cpu",
                   return_model: bool = False):
    """Train every member; one record per member with its test accuracy, full-train accuracy/loss, fit and norms.

    Attempt k (k = 0 .. ``restarts``) trains the members that have not yet fitted their training set (train
    accuracy on all m examples >= ``fit_acc``) from a fresh initialisation at learning rate ``lr_grid[k % len]``
    (or ``lr``); each attempt has the same budget (``max_steps``). A member keeps its first fitting attempt, else
    the attempt of lowest training loss. The choice uses training data only. With ``return_model`` the
    returned (records, model, chosen) holds each member's kept weights: ``chosen[i]`` is member i's index.
    """
    if not members:
        raise ConfigError("train_ensemble needs at least one member")
    if len({mb.task.T for mb in members}) != 1:
        raise ConfigError("all members of an ensemble must share T")
    dev = torch.device(device)
    t0 = time.perf_counter()
    data = _stack_data(members, cfg.n_test, dev)
    lrs = list(cfg.lr_grid) or [cfg.lr]
    recs: list[Optional[dict[str, Any]]] = [None] * len(members)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    pending = list(range(len(members)))
    for k in range(cfg.restarts + 1):
        runs = [Member(members[i].task, members[i].m, members[i].seed + k * 1_000_003) for i in pending]
        rows = data[4][pending]
        out, model = _attempt(runs, rows, lrs[k % len(lrs)], cfg, dev, data)
        for pos, i in enumerate(pending):
            rec = {**out[pos], "restarts": k, "attempts": k + 1, "lr": lrs[k % len(lrs)]}
            old = recs[i]
            if old is None or rec["fit"] or rec["train_loss"] < old["train_loss"]:
                recs[i] = rec
                if return_model:
                    kept[i] = {n: p[pos].detach().clone() for n, p in model.named_parameters()}
            else:
                recs[i] = {**old, "attempts": k + 1}
        pending = [i for i in pending if not recs[i]["fit"]]
        if not pending:
            break
    secs = round((time.perf_counter() - t0) / len(members), 4)
    done = [{**r, "seconds": secs} for r in recs]  # type: ignore[dict-item]
    if not return_model:
        return done
    model = _new_model(list(members), cfg).to(dev)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.stack([kept[i][n] for i in range(len(members))]))
    return done, model, list(range(len(members)))


def _new_model(runs: Sequence[Member], cfg: EnsembleConfig) -> torch.nn.Module:
    """A fresh ensemble of the configured kind, one member per run (its init from the run's seed)."""
    return BoundedHeads(runs, cfg.d_model, cfg.n_heads) if cfg.kind == "bounded" else MLPEnsemble(runs, cfg.width)


def _attempt(runs: Sequence[Member], mt: torch.Tensor, lr: float, cfg: EnsembleConfig, dev: torch.device, data
             ) -> tuple[list[dict[str, Any]], torch.nn.Module]:
    """One training attempt of every run (early stopping on its own training loss); records and the model
    holding each run's weights of lowest monitored training loss."""
    tx, ty, sx, sy, _ = data
    E = len(runs)
    model = _new_model(runs, cfg).to(dev)
    if cfg.kind == "bounded":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    bounds = cfg.bounds if cfg.kind == "bounded" else None
    if bounds is not None:
        model.project(bounds)
    ms = torch.tensor([mb.m for mb in runs], device=dev)
    n_mon = ms.clamp(max=cfg.n_monitor)
    bs = cfg.batch_size
    # batch indices from each run's own generator: u in [0, 1) scaled to its train size
    u = torch.stack([torch.rand(cfg.max_steps, bs, generator=_gen(mb.seed, mb.m, 3)) for mb in runs], 1)
    batches = (u.to(dev) * ms.view(1, E, 1)).long().clamp_max(ms.view(1, E, 1) - 1)  # (steps, E, B)
    best = torch.full((E,), math.inf, device=dev)
    best_acc = torch.zeros(E, device=dev)
    best_step = torch.zeros(E, dtype=torch.long, device=dev)
    stale = torch.zeros(E, dtype=torch.long, device=dev)
    done = torch.zeros(E, dtype=torch.bool, device=dev)
    snap = {k: p.detach().clone() for k, p in model.named_parameters()}
    rows = mt.view(E, 1)
    step, first = 0, None
    for step in range(1, cfg.max_steps + 1):
        idx = batches[step - 1]
        xb, yb = tx[rows, idx], ty[rows, idx]  # (E, B, N), (E, B)
        logits = model(model.encode(xb))
        loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum") / bs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bounds is not None:
            model.project(bounds)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            acc, tl = _evaluate(model, tx, ty, mt, n_mon, cfg.eval_chunk)
            tl = torch.nan_to_num(tl, nan=math.inf)  # a diverged run never beats its earlier weights
            if first is None:
                first = tl.clone()
            better = (tl < best * (1 - 1e-3)) & ~done
            best = torch.where(better, tl, best)
            best_acc = torch.where(better, acc, best_acc)
            best_step = torch.where(better, torch.full_like(best_step, step), best_step)
            # patience only counts once the loss has left its initial plateau: a run still sitting at the
            # saddle (loss ~ ln 2, common at large T and large m) keeps training up to max_steps
            moved = best < 0.9 * first
            stale = torch.where(better | ~moved, torch.zeros_like(stale), stale + 1)
            with torch.no_grad():
                for k, p in model.named_parameters():
                    snap[k] = torch.where(better.view(-1, *[1] * (p.dim() - 1)), p.detach(), snap[k])
            done |= (stale >= cfg.patience) | ((best_acc >= 1.0) & (best < cfg.stop_loss)) | ~torch.isfinite(tl)
            if bool(done.all()):
                break
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(snap[k])
    train_acc, train_loss = _evaluate(model, tx, ty, mt, ms, cfg.eval_chunk)  # every training example
    test, _ = _evaluate(model, sx, sy, mt, torch.full_like(ms, cfg.n_test), cfg.eval_chunk)
    norms = {k: v.tolist() for k, v in model.norms().items()}
    probe = relevant_mass(model, sx, mt, runs, cfg.n_probe) if cfg.kind == "bounded" and cfg.n_probe else None
    tl_full = torch.nan_to_num(train_loss, nan=math.inf).tolist()
    recs = [{"accuracy": round(float(test[e]), 6), "train_acc": round(float(train_acc[e]), 6),
             "train_loss": round(tl_full[e], 6), "fit": bool(train_acc[e] >= cfg.fit_acc),
             "monitor_loss": round(float(best[e]), 6), "steps": step, "best_step": int(best_step[e]),
             **{f"norm_{k}": round(v[e], 6) for k, v in norms.items()},
             **({k: round(float(v[e]), 6) for k, v in probe.items()} if probe else {})} for e in range(E)]
    return recs, model


@torch.no_grad()
def bounded_probe(model: BoundedHeads, member: int, task: SparseBooleanTask, n: int = 256, stream: int = 12345
                  ) -> dict[str, Any]:
    """Readout attention mass on the relevant positions, per head, for one member of a trained ensemble."""
    x, _ = task.sample(n, stream=stream, noise=0.0)
    dev = model.tok.device
    E = model.tok.shape[0]
    ids = torch.zeros(E, n, task.seq_len, dtype=torch.long, device=dev)
    ids[member] = x.to(dev)
    _, p = model(model.encode(ids), return_attention=True)
    p = p[member]  # (n, H, N)
    R = torch.zeros(task.seq_len, dtype=torch.bool, device=dev)
    R[list(task.relevant_tokens)] = True
    s = len(task.relevant)
    mass = p[..., R].sum(-1).mean(0)
    topk = R[p.topk(s, dim=-1).indices].float().mean(-1).mean(0)
    return {"mass": [mass.tolist()], "topk_precision": [topk.tolist()], "relevant": list(task.relevant_tokens),
            "attention": "softmax", "n": n}
