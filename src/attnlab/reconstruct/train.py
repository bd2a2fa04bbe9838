"""Train our small transformer with reconstructed attention (vs full attention): the paper's third experiment.

Tasks on Python stdlib docstrings as bytes (fit documents for training, held-out documents for evaluation):
``clm`` (next-byte prediction, causal model) and ``mlm`` (masked-byte prediction, bidirectional model; 15% of
positions replaced by a mask id, fixed masks on the held-out windows). Every configuration trains once per seed
(the same seeds, data order and initialisation for every configuration, so gaps are paired), with a held-out loss
curve; the summary gives the final held-out loss gap to full attention with its spread across seeds. In every layer, each head computes its scores exactly only on the selected pairs and
estimates the rest (conditional Gaussian by default); gradients flow through the selected scores and
the (linear) estimator. The statistics the estimator needs drift while the model trains, so they are
refitted from exact-attention forward passes on training batches every ``refresh`` steps (the fitted
statistics are constants for the gradient). Dense scores are computed and only the selected entries
are read: this simulates the approximation's effect on learning; it does not make training faster.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..attention import AttentionCall
from ..errors import ConfigError, CorpusError, ResultsError
from ..io import checkpoint_written, read_json, write_json
from ..validate import check_fields
from ..models.attention import masked_softmax
from ..models.transformer import SmallTransformer, TransformerConfig
from ..seeding import seed_everything
from ..sources.small import SmallSource
from ..training import adamw, train_steps, warmup_cosine
from .estimators import estimator_kind
from .evaluate import Combo, Method
from .fit import fit_from_windows

_log = logging.getLogger(__name__)


PROXY_KINDS = ("bilinear", "pca", "random")


@dataclass
class TrainConfig:
    """Settings of the reconstruction-training comparison (CLI flags have the same names)."""

    budgets: list = field(default_factory=lambda: [0.125, 0.25, 0.5])  # fractions (or counts) of pairs per row
    estimator: str = "gaussian"  # estimator for the unselected pairs
    estimators: Optional[list] = None  # several estimators compared (overrides ``estimator``)
    selections: list = field(default_factory=lambda: ["adaptive", "random"])  # selection strategies compared
    objectives: list = field(default_factory=lambda: ["clm"])  # clm (next byte, causal) and/or mlm (masked byte)
    seeds: list = field(default_factory=lambda: [0])  # one run per seed and configuration
    seq_len: int = 64  # characters per window
    d_model: int = 64  # model width
    n_heads: int = 4  # heads per layer
    n_layers: int = 2  # blocks
    steps: int = 300  # optimiser steps per run
    batch_size: int = 32  # windows per step
    lr: float = 3e-3  # AdamW learning rate (cosine decay to 10%)
    refresh: int = 50  # steps between refits of the estimator statistics
    refit_windows: int = 128  # training windows used for each refit
    proxy: str = "bilinear"  # proxy of the adaptive selection
    proxy_rank: int = 2  # proxy dimension r (d_head = d_model / n_heads)
    eval_windows: int = 128  # held-out windows for the held-out losses
    eval_every: int = 0  # steps between held-out curve points (0: log_every)
    mask_rate: float = 0.15  # mlm: share of positions masked
    max_chars: int = 400_000  # characters of training text read
    log_every: int = 25  # steps between curve points
    device: str = "cpu"
    seed: int = 0  # base seed (held-out choice); ``seeds`` seed the runs

    def validate(self) -> None:
        """Raise ConfigError on bad values."""
        check_fields(self)
        for n in ("seq_len", "d_model", "n_heads", "n_layers", "steps", "batch_size", "refresh", "refit_windows",
                  "eval_windows", "log_every"):
            if getattr(self, n) < 1:
                raise ConfigError(f"--{n.replace('_', '-')} must be >= 1 (got {getattr(self, n)})")
        if not self.budgets:
            raise ConfigError("--budgets is empty")
        # names and budgets checked before the first (minutes-long) training run, not after it
        from .evaluate import Combo
        from .selection import budget_count

        for b in self.budgets:
            budget_count(b, self.seq_len, flag="--budgets")
        for sel in self.selections:
            Combo(self.estimator, sel).validate()
        if self.proxy not in PROXY_KINDS:
            raise ConfigError(f"--proxy must be one of {', '.join(PROXY_KINDS)} (got {self.proxy!r})")
        if not self.seeds:
            raise ConfigError("--seeds is empty")
        bad = [x for x in self.seeds if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise ConfigError(f"--seeds must be integers (got {bad[0]!r})")
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise ConfigError(f"--objectives: unknown {o!r} (choose from {', '.join(OBJECTIVES)})")
        if not 0 < self.mask_rate < 1:
            raise ConfigError(f"--mask-rate must be in (0, 1) (got {self.mask_rate})")


OBJECTIVES = ("clm", "mlm")
MASK_ID = 256  # mlm mask id (bytes are 0..255)


@functools.lru_cache(maxsize=8)
def char_windows(seq_len: int, split: str, max_chars: int) -> torch.Tensor:
    """Byte-level windows (M, seq_len) of stdlib docstrings from one split ('fit' or 'heldout'); cached (callers
    only index it)."""
    from ..capture.corpus import is_heldout, stdlib_docstrings

    buf = bytearray()
    for doc in stdlib_docstrings():
        if is_heldout(doc, 0.2) != (split == "heldout"):
            continue
        buf.extend(doc.encode("utf-8", "replace") + b"\n\n")
        if len(buf) >= max_chars:
            break
    m = len(buf) // seq_len
    if m < 2:
        raise CorpusError(f"only {len(buf)} characters in split {split!r}; lower --seq-len")
    return torch.frombuffer(bytearray(buf[: m * seq_len]), dtype=torch.uint8).long().view(m, seq_len)


class ReconstructedAttention:
    """Attention handler that applies one reconstruction method to every head (softmax of the estimates)."""

    def __init__(self, method: Optional[Method] = None):
        self.method = method

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        scores = call.scores()  # (B, H, N, N), -inf where masked
        est = torch.stack([self.method.reconstruct(call, h, scores[:, h]) for h in range(call.n_heads)], 1)
        return masked_softmax(est, call.valid) @ call.value


def mlm_mask(ids: torch.Tensor, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs with ``rate`` of positions replaced by MASK_ID, labels with -100 elsewhere); at least one per row."""
    pick = torch.rand(ids.shape, generator=generator) < rate
    pick[torch.arange(len(ids)), torch.randint(ids.shape[1], (len(ids),), generator=generator)] = True
    return ids.masked_fill(pick, MASK_ID), ids.masked_fill(~pick, -100)


def _loss(model: SmallTransformer, ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    logits = model(ids).logits  # (B, N, V)
    if labels is not None:  # mlm
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _refit(model: SmallTransformer, windows: torch.Tensor, combo: Combo, budget, cfg: TrainConfig) -> Method:
    resid = [(cfg.proxy, cfg.proxy_rank, cfg.seed)] if estimator_kind(combo.estimator).needs_residual else []
    fit = fit_from_windows(model, windows, batch_size=64, model_name="small-transformer", residual_proxies=resid)
    m = Method(fit, combo, 0, proxy=cfg.proxy, proxy_rank=cfg.proxy_rank, seed=cfg.seed, dtype=torch.float32)
    from .selection import budget_count

    m.b = budget_count(budget, cfg.seq_len)
    return m


@torch.no_grad()
def heldout_loss(model: SmallTransformer, windows: torch.Tensor, batch_size: int = 64,
                 labels: Optional[torch.Tensor] = None) -> float:
    """Mean cross-entropy (nats) on ``windows`` (next byte; masked bytes when ``labels`` are given)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    dev = next(model.parameters()).device
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(dev)
        lab = None if labels is None else labels[i:i + batch_size].to(dev)
        w = ids.shape[0] if lab is None else int((lab != -100).sum())
        tot += float(_loss(model, ids, lab)) * w
        n += w
    model.train(was)
    return tot / max(n, 1)


def train_one(cfg: TrainConfig, train: torch.Tensor, heldout: torch.Tensor, combo: Optional[Combo],
              budget=None, objective: str = "clm", seed: Optional[int] = None,
              heldout_labels: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Train one model (full attention when ``combo`` is None); returns its curves and final held-out losses."""
    seed = cfg.seed if seed is None else seed
    g = seed_everything(seed)
    mlm = objective == "mlm"
    tcfg = TransformerConfig(vocab_size=257 if mlm else 256, d_model=cfg.d_model, n_heads=cfg.n_heads,
                             n_layers=cfg.n_layers, max_len=cfg.seq_len, causal=not mlm)
    dev = torch.device(cfg.device)
    model = SmallTransformer(tcfg).to(dev)
    opt = adamw(model, cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.steps, floor=0.1)
    curve, held, t0 = [], [], time.perf_counter()
    attention = ReconstructedAttention()
    smooth: list = []
    every = cfg.eval_every or cfg.log_every
    g_refit = torch.Generator().manual_seed(seed + 12_345)  # refits draw apart: every run sees the same batches

    def step_loss(step: int) -> torch.Tensor:
        if combo is not None and step % cfg.refresh == 0:
            pick = torch.randint(len(train), (min(cfg.refit_windows, len(train)),), generator=g_refit)
            fw = train[pick]
            if mlm:
                fw = mlm_mask(fw, cfg.mask_rate, g_refit)[0]
            attention.method = _refit(model, fw.to(dev), combo, budget, cfg)
        ids = train[torch.randint(len(train), (cfg.batch_size,), generator=g)]
        labels = None
        if mlm:
            ids, labels = mlm_mask(ids, cfg.mask_rate, g)
            labels = labels.to(dev)
        return _loss(model, ids.to(dev), labels)

    def after_step(done: int, loss: torch.Tensor) -> None:
        lv = float(loss.detach())
        smooth[:] = [lv if not smooth else 0.9 * smooth[0] + 0.1 * lv]
        if done % cfg.log_every == 0 or done == cfg.steps:
            curve.append({"step": done, "train_loss": smooth[0]})
        if done % every == 0 or done == cfg.steps:  # with the attention it trains with
            held.append({"step": done, "heldout_loss": heldout_loss(model, heldout, labels=heldout_labels)})

    # reconstructed attention while training (the refit inside nests its own exact-attention hooks)
    with SmallSource(model).hooks(attention) if combo is not None else contextlib.nullcontext():
        train_steps(model, opt, cfg.steps, step_loss, sched=sched, clip=1.0, after_step=after_step)
        method = attention.method
    res: dict[str, Any] = {"label": "full" if combo is None else combo.label, "budget": budget, "objective": objective,
                           "seed": seed, "budget_pairs": None if method is None else method.b, "curve": curve,
                           "heldout_curve": held}
    res["heldout_loss"] = held[-1]["heldout_loss"]  # with the attention it was trained with
    res["heldout_loss_exact_attention"] = heldout_loss(model, heldout, labels=heldout_labels)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _stats(xs: list[float]) -> dict[str, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarise_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (objective, method, budget): final held-out loss and its paired gap to full attention, mean +- sd over
    seeds, and the held-out curve averaged over seeds (with sd)."""
    full = {(r["objective"], r["seed"]): r["heldout_loss"] for r in runs if r["label"] == "full"}
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["objective"], r["label"], r["budget"]), []).append(r)
    out = []
    for (obj, lab, bud), rs in groups.items():
        gaps = [r["heldout_loss"] - full[(obj, r["seed"])] for r in rs if (obj, r["seed"]) in full]
        steps = [p["step"] for p in rs[0]["heldout_curve"]]
        curve = [_stats([r["heldout_curve"][i]["heldout_loss"] for r in rs]) for i in range(len(steps))]
        row = {"objective": obj, "label": lab, "budget": bud, "seeds": [r["seed"] for r in rs],
               "heldout_loss": _stats([r["heldout_loss"] for r in rs]),
               "heldout_loss_exact_attention": _stats([r["heldout_loss_exact_attention"] for r in rs]),
               "gap_to_full": _stats(gaps) if gaps else None, "curve_steps": steps,
               "curve_mean": [c["mean"] for c in curve], "curve_std": [c["std"] for c in curve],
               "compute": rs[0].get("compute")}
        if row["gap_to_full"] and len(gaps) > 1 and lab != "full":  # real only when the 95% t-interval excludes 0
            from scipy.stats import t as student_t

            half = float(student_t.ppf(0.975, len(gaps) - 1)) * row["gap_to_full"]["std"] / len(gaps) ** 0.5
            m = row["gap_to_full"]["mean"]
            row["gap_ci95"] = [m - half, m + half]
            row["gap_verdict"] = "worse" if m - half > 0 else "better" if m + half < 0 else "inconclusive"
        out.append(row)
    return out


def format_summary(summary: list[dict[str, Any]]) -> str:
    """Plain-text final gap table."""
    head = (f"{'objective':9s} {'method':24s} {'budget':>6s} {'compute':>7s}  {'held-out loss':>17s}  "
            f"{'gap to full (paired)':>22s}  {'95% CI':>19s}  verdict")
    lines = [head, "-" * len(head)]
    pm = lambda s, signed="": f"{s['mean']:{signed}.4f} ± {s['std']:.4f}" if s.get("n", 2) > 1 else f"{s['mean']:{signed}.4f}"  # noqa: E731
    for r in summary:
        h, gp = r["heldout_loss"], r["gap_to_full"]
        comp = "" if r["compute"] is None else f"{r['compute']:.3f}"
        lines.append(f"{r['objective']:9s} {r['label']:24s} {str(r['budget']):>6s} {comp:>7s}  "
                     f"{pm(h):>17s}  " + (f"{pm(gp, '+'):>22s}" if gp else f"{'-':>22s}")
                     + (f"  [{r['gap_ci95'][0]:+.4f}, {r['gap_ci95'][1]:+.4f}]" if "gap_ci95" in r else " " * 21)
                     + f"  {r.get('gap_verdict', '')}")
    if summary and all(r["heldout_loss"].get("n", 2) <= 1 for r in summary):
        from ..textfmt import NO_INTERVAL

        lines.append(f"{NO_INTERVAL} (give --seeds 0,1,2 for paired 95% intervals of the gap)")
    return "\n".join(lines)


PARTIAL = "reconstruct_train.partial.json"  # finished runs of an interrupted `reconstruct train` (inside --out)
PARTIAL_KIND = "attnlab reconstruct train partial"


def _jobs(cfg: TrainConfig) -> list[tuple[str, int, Optional[Combo], Any]]:
    """Every training run in order: (objective, seed, combo or None for full attention, budget)."""
    out: list[tuple[str, int, Optional[Combo], Any]] = []
    for obj in cfg.objectives:
        for seed in cfg.seeds:
            out.append((obj, seed, None, None))
            for est in cfg.estimators or [cfg.estimator]:
                for sel in cfg.selections:
                    for b in cfg.budgets:
                        combo = Combo(est, sel)
                        combo.validate()
                        out.append((obj, seed, combo, b))
    return out


def _finished_runs(path: Optional[Path], cfg: TrainConfig, resume: bool) -> list[dict[str, Any]]:
    """The runs an interrupted run with the same settings finished (``resume``), else none."""
    if path is None or not resume or not path.exists():
        return []
    prev = read_json(path)
    if not isinstance(prev, dict) or prev.get("kind") != PARTIAL_KIND:
        raise ResultsError(f"{path}: not an attnlab reconstruct-train checkpoint; delete it or run without --resume")
    if prev.get("config") != json.loads(json.dumps(asdict(cfg))):
        raise ResultsError(f"{path}: the interrupted run had other settings; re-run with the original settings, "
                           "or without --resume to start over")
    return list(prev.get("runs") or [])


def train_compare(cfg: Optional[TrainConfig] = None, progress: bool = True, checkpoint: Optional[str | Path] = None,
                  resume: bool = False, **kw: Any) -> dict[str, Any]:
    """Full attention vs reconstructed attention at every objective, budget, estimator, selection and seed.

    ``checkpoint``: a JSON file rewritten atomically after every training run with the runs finished so far; with
    ``resume`` those runs are kept and training continues with the next one (each run depends on its own seed
    only, so the result equals an uninterrupted run's); a checkpoint from other settings is refused."""
    from .cost import cost_breakdown
    from .selection import budget_count

    cfg = cfg or TrainConfig(**kw)
    cfg.validate()
    path = None if checkpoint is None else Path(checkpoint)
    jobs, done = _jobs(cfg), _finished_runs(path, cfg, resume)  # other settings: refused before any work
    torch.manual_seed(cfg.seed)
    train = char_windows(cfg.seq_len, "fit", cfg.max_chars)
    heldout = char_windows(cfg.seq_len, "heldout", cfg.max_chars // 4)
    g = torch.Generator().manual_seed(cfg.seed)
    heldout = heldout[torch.randperm(len(heldout), generator=g)[: cfg.eval_windows]]
    say = _log.info if progress else _log.debug
    d_head = cfg.d_model // cfg.n_heads
    held = {o: (heldout, None) for o in cfg.objectives}
    if "mlm" in held:  # fixed masks on the held-out windows, the same for every run
        held["mlm"] = mlm_mask(heldout, cfg.mask_rate, torch.Generator().manual_seed(cfg.seed + 7))
    if done:
        say(f"resuming from {path}: {len(done)} of {len(jobs)} training runs already finished")
    runs = list(done[:len(jobs)])
    for obj, seed, combo, b in jobs[len(runs):]:
        h_ids, h_lab = held[obj]
        r = train_one(cfg, train, h_ids, combo, b, objective=obj, seed=seed, heldout_labels=h_lab)
        r["compute"] = 1.0 if combo is None else cost_breakdown(
            combo.estimator, combo.selection, cfg.seq_len, d_head, budget_count(b, cfg.seq_len), cfg.proxy_rank)["compute"]
        runs.append(r)
        if combo is None:
            say(f"[{obj} seed {seed}] full attention: held-out loss {r['heldout_loss']:.4f} ({r['seconds']} s)")
        else:
            say(f"[{obj} seed {seed}] {combo.label} budget {b}: held-out loss {r['heldout_loss']:.4f} "
                f"(exact attention {r['heldout_loss_exact_attention']:.4f}; {r['seconds']} s)")
        if path is not None and len(runs) < len(jobs):
            write_json(path, {"kind": PARTIAL_KIND, "config": asdict(cfg), "runs": runs})
            checkpoint_written()
    tasks = {"clm": "next-byte causal LM", "mlm": f"masked-byte LM ({cfg.mask_rate:.0%} masked)"}
    return {"config": asdict(cfg), "runs": runs, "summary": summarise_runs(runs),
            "task": "; ".join(tasks[o] for o in cfg.objectives) + " on stdlib docstrings (bytes)",
            "n_train_windows": int(len(train)), "n_heldout_windows": int(len(heldout))}
