"""`attnlab reconstruct run`: fit on the corpus' fit split, evaluate every estimator x selection on held-out
text, sweep the budget, measure the drop-in effect on the model's outputs; writes section 'reconstruct'."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..capture.corpus import MIN_EVAL_WINDOWS
from ..distributed import barrier, device_for, init_distributed
from ..io import RunDir, write_tensors
from ..seeding import seed_everything
from .config import (  # noqa: F401  (re-exported: the settings and their checks live there)
    DEFAULT_ESTIMATORS,
    DEFAULT_SELECTIONS,
    ReconstructConfig,
    check_ranks,
    combos_for,
    residual_proxies,
)
from .estimators import estimator_kind
from .evaluate import evaluate, make_methods
from .fit import FIT_FILE, ReconstructionFit, check_no_leak, fit_corpus, fit_from_spectrum, load_checked, windows_for
from .cost import method_cost
from .frontier import best_at, candidates, evaluate_points, format_frontier, frontier_curves, require_affordable
from .selection import budget_count
from ..timing import Phases

_log = logging.getLogger(__name__)

SECTION = "reconstruct"
TENSORS = "reconstruct.safetensors"
TV_TARGET = 0.05


def best_label(table: dict[str, Any], exclude_oracle: bool = True) -> str:
    """The method with the lowest worst-layer TV (the quality bar is per layer)."""
    cands = {k: v for k, v in table.items() if not (exclude_oracle and v["selection"] == "oracle")}
    return min(cands, key=lambda k: max(v["tv"] for v in cands[k]["per_layer"].values()))


def get_fit(cfg: ReconstructConfig, hf, progress: bool = False) -> ReconstructionFit:
    """Load, derive from a spectrum run, or fit the statistics (fit split only)."""
    if cfg.fit_path:
        return ReconstructionFit.load(cfg.fit_path, model=cfg.model, seq_len=cfg.seq_len)
    if cfg.spectrum:
        fit = fit_from_spectrum(cfg.spectrum)
        fit.check(cfg.model, cfg.seq_len, cfg.spectrum)
        check_no_leak(fit, cfg.corpus)
        return fit
    return fit_corpus(hf, cfg.n_fit, cfg.seq_len, cfg.layers, cfg.heads, cfg.batch_size, cfg.corpus, cfg.seed,
                      progress=progress, residual_proxies=residual_proxies(cfg))


def fit_message(cfg: ReconstructConfig, fit: ReconstructionFit, seconds: float) -> str:
    """What the fit step did: loaded (--fit-path), taken from a spectrum run, or fitted, and how long it took."""
    what = (f"loaded fitted statistics from {cfg.fit_path}" if cfg.fit_path else
            f"took row statistics from spectrum run {cfg.spectrum}" if cfg.spectrum else "fitted statistics")
    return f"{what} ({fit.meta.get('source')}, {fit.meta.get('n_sequences')} windows) in {seconds:.1f} s"


def _strip(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "per_head"}


def reconstruct(out: str | Path, model: str = "minilm", progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Run the reconstruction study into run directory ``out``; returns the results section.

    Under torchrun (gloo on CPU, nccl with one GPU per rank for ``device='cuda'``) the fit's windows are sharded and its float64
    sums all-reduced, every evaluation shards the held-out windows and sums the per-row metrics across ranks, so
    each rank holds the same numbers; the drop-in output check runs on rank 0 alone, and rank 0 writes."""
    cfg = _checked_config(model, settings)
    seed_everything(cfg.seed)
    info = init_distributed(cfg.device)
    run = RunDir(out)
    t0 = time.perf_counter()
    hf, windows = _model_and_windows(cfg, info)
    t_work = time.perf_counter()
    phases = Phases()
    show = progress and info.is_main
    say = _log.info if show else _log.debug
    with phases("fit"):
        fit = get_fit(cfg, hf, progress=show)
    fit.meta["model"] = cfg.model
    if info.is_main:
        fit.save(run.file(FIT_FILE))
    say(fit_message(cfg, fit, phases.seconds["fit"]))
    kw = dict(k=cfg.k, ridge=cfg.ridge, jitter=cfg.jitter, proxy=cfg.proxy, proxy_rank=cfg.proxy_rank, seed=cfg.seed)
    methods = _all_methods(cfg, fit, kw)
    by_label = {m.label: m for m in methods}
    if cfg.compute is not None:  # fail before evaluating anything when nothing fits the compute budget
        require_affordable(fit, cfg.compute, cfg.families, fractions=cfg.frontier_budgets, ranks=cfg.frontier_ranks)
    with phases("evaluate"):
        table = evaluate(hf, windows, methods, cfg.layers, cfg.heads, cfg.batch_size, cfg.topk, progress=show)
    for m in methods:
        table[m.label]["cost"] = method_cost(m, hf.head_dim)
    res = _table_results(cfg, hf, windows, fit, table, say)
    _frontier_step(cfg, hf, windows, fit, table, res, phases, show, say)
    tensors, L, H = _head_tensors(table)
    sweep_labels = _sweep_step(cfg, hf, windows, fit, table, res, by_label, kw, phases, show, say)
    res["world_size"] = info.world_size
    res["sharded_seconds"] = round(time.perf_counter() - t_work, 3)  # fit + evaluations (what torchrun spreads)
    if not info.is_main:  # the drop-in check (rank 0 alone) and the writes are rank 0's
        barrier(info)
        return res
    if cfg.dropin:
        _dropin_step(cfg, hf, windows, fit, res, by_label, sweep_labels, kw, phases, say)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["phases"] = phases.as_dict()  # *_seconds: kept in timings.json
    _write_run(run, cfg, res, tensors, L, H)
    barrier(info)
    return res


def _checked_config(model: str, settings: dict[str, Any]) -> ReconstructConfig:
    """The validated config (a --spectrum fit has no per-position sums: position-conditioned gaussian is skipped)."""
    cfg = ReconstructConfig(model=model, **settings)
    if cfg.spectrum and cfg.position:  # a spectrum run has no per-position sums: say so instead of failing late
        from ..capture.corpus import log

        log.warning("--spectrum %s: position-conditioned gaussian skipped (a spectrum run stores no per-position "
                    "sums); fit from a corpus for it, or pass --no-position to silence this", cfg.spectrum)
        cfg.position = False
    cfg.validate()
    return cfg


def _model_and_windows(cfg: ReconstructConfig, info: Any) -> tuple[Any, torch.Tensor]:
    """The model (its task head if saved) and the held-out windows, loaded first: a corpus too small to evaluate
    on, a bad proxy rank or too few windows per rank fail before the fit, not after it."""
    from ..distributed import require_work_per_rank

    hf = load_checked(cfg.model, cfg.seq_len, head="auto", device=device_for(info, cfg.device))
    windows = windows_for(hf.tokenizer, cfg.seq_len, cfg.n_eval, "heldout", cfg.corpus, cfg.seed + 1, flag="--n-eval",
                          minimum=MIN_EVAL_WINDOWS)
    check_ranks(cfg, hf.head_dim)
    require_work_per_rank(len(windows), info, "--n-eval")
    return hf, windows


def _all_methods(cfg: ReconstructConfig, fit: ReconstructionFit, kw: dict[str, Any]) -> list:
    """The methods of the grid, plus the adaptive rows of the estimators tagged for it at every --extra-ranks."""
    combos = combos_for(cfg)
    methods = make_methods(fit, combos, cfg.budget, **kw)
    extra = [c for c in combos if c.selection == "adaptive" and estimator_kind(c.estimator).rank_sweep
             and not c.position and not c.pool_heads]
    for rk in cfg.extra_ranks:
        if rk != cfg.proxy_rank:
            methods += make_methods(fit, extra, cfg.budget, **{**kw, "proxy_rank": rk})
    return methods


def _table_results(cfg: ReconstructConfig, hf: Any, windows: torch.Tensor, fit: ReconstructionFit,
                   table: dict[str, Any], say: Any) -> dict[str, Any]:
    """The results section from the evaluated table: config, model, budget, fit, the table and its best method."""
    best = best_label(table)
    from ..report.summary import methods_text

    say(f"evaluated {methods_text({'table': table})} on {len(windows)} held-out windows; best at --budget {best} "
        f"(total compute {table[best]['cost']['compute']:.3f})")
    b = budget_count(cfg.budget, cfg.seq_len)
    return {
        "config": asdict(cfg), "model": hf.describe(), "budget_pairs": b, "budget_fraction": b / cfg.seq_len,
        "n_eval": int(len(windows)), "fit": {k: v for k, v in fit.meta.items() if k != "kind"}, "target_tv": TV_TARGET,
        "table": {k: _strip(v) for k, v in table.items()}, "best": best,
        "best_worst_layer_tv": max(v["tv"] for v in table[best]["per_layer"].values()),
    }


def _frontier_step(cfg: ReconstructConfig, hf: Any, windows: torch.Tensor, fit: ReconstructionFit,
                   table: dict[str, Any], res: dict[str, Any], phases: Phases, show: bool, say: Any) -> None:
    """The TV-vs-total-compute frontier (--frontier / --compute) into ``res``; with --compute, 'best' is chosen
    among the table's methods and the frontier's points that fit it. Then the winner's cost in ``res``."""
    if cfg.frontier and cfg.compute is None and not fit.meta.get("d_head"):
        res["frontier_note"] = "no frontier: this fit has no query/key moments (spectrum run), so no proxy"
    elif cfg.frontier or cfg.compute is not None:
        cap = 1.0 if cfg.compute is None else cfg.compute
        pts, skipped = candidates(fit, cfg.families, max_compute=cap, proxy=cfg.proxy, seed=cfg.seed,
                                  fractions=cfg.frontier_budgets, ranks=cfg.frontier_ranks)
        with phases("frontier"):
            front = evaluate_points(hf, windows, pts, cfg.chunks, cfg.batch_size, cfg.layers, cfg.heads,
                                    progress=show)
        res["frontier_points"], res["frontier"] = front, frontier_curves(front)
        res["frontier_skipped"] = skipped
        res["best_at_compute"] = {str(c): best_at(front, c) for c in ((0.25, 0.5) if cfg.compute is None else (cfg.compute,))}
        say(format_frontier(front, (0.25, 0.5) if cfg.compute is None else (cfg.compute,)))
        if cfg.compute is not None:
            # 'best' at a total-compute budget: the table's methods and the frontier's points that fit it
            pool = {k: {"compute": v["cost"]["compute"], "tv": max(x["tv"] for x in v["per_layer"].values())}
                    for k, v in table.items() if v["selection"] != "oracle"}
            pool.update({k: {"compute": v["compute"], "tv": v["worst_layer_tv_pooled"]} for k, v in front.items()})
            ok = {k: v for k, v in pool.items() if v["compute"] <= cfg.compute + 1e-12}
            best = min(ok, key=lambda k: ok[k]["tv"])
            res.update({"best": best, "best_worst_layer_tv": ok[best]["tv"], "best_compute": ok[best]["compute"],
                        "best_chosen_at": f"total compute <= {cfg.compute}"})
    best = res["best"]
    if "best_compute" not in res:
        res.update({"best_compute": table[best]["cost"]["compute"], "best_chosen_at": f"pair budget {res['budget_pairs']}"})
    best_cost = table[best]["cost"] if best in table else res["frontier_points"][best]["cost"]
    res["best_cost"] = best_cost
    # the proxy's share at the winning method's own rank (r / d_head), not the base --proxy-rank
    res["proxy_cost_fraction"] = best_cost["fractions"]["proxy_scores"] if best_cost["proxy_rank"] else 0.0
    res["meets_target"] = res["best_worst_layer_tv"] < TV_TARGET


def _head_tensors(table: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """TV per (layer, head) of every method ('tv.<label>': (L, H)), with the layers and heads."""
    tensors = {}
    L = sorted({int(x.split(".")[0]) for x in next(iter(table.values()))["per_head"]})
    H = sorted({int(x.split(".")[1]) for x in next(iter(table.values()))["per_head"]})
    for lab, v in table.items():
        tensors[f"tv.{lab}"] = torch.tensor([[v["per_head"][f"{l}.{h}"]["tv"] for h in H] for l in L])
    return tensors, L, H


def _sweep_step(cfg: ReconstructConfig, hf: Any, windows: torch.Tensor, fit: ReconstructionFit, table: dict[str, Any],
                res: dict[str, Any], by_label: dict[str, Any], kw: dict[str, Any], phases: Phases, show: bool,
                say: Any) -> list[str]:
    """Budget sweep (--budgets) of the best method of the table and the best input-independent one, into
    ``res['sweep']``; returns those labels (the drop-in runs them too)."""
    best = res["best"]
    fixed = {k: v for k, v in table.items() if v["selection"] not in ("adaptive", "oracle")}
    sweep_labels = [best if best in by_label else best_label(table)] + ([best_label(fixed)] if fixed else [])
    res["sweep"] = {}
    if cfg.budgets:
        for lab in dict.fromkeys(sweep_labels):
            res["sweep"][lab] = {}
            for bud in cfg.budgets:
                m0 = by_label[lab]
                kk = {**kw, "proxy_rank": m0.proxy_rank}
                if estimator_kind(m0.combo.estimator).needs_k and cfg.k is not None:
                    kk["k"] = min(cfg.k, budget_count(bud, cfg.seq_len))
                ms = make_methods(fit, [m0.combo], bud, **kk)
                with phases("sweep"):
                    r = evaluate(hf, windows, ms, cfg.layers, cfg.heads, cfg.batch_size, cfg.topk, progress=show)
                res["sweep"][lab][str(bud)] = {**_strip(r[lab]), "cost": method_cost(ms[0], hf.head_dim)}
        say(f"budget sweep over {cfg.budgets} for {list(res['sweep'])}")
    return sweep_labels


def _dropin_step(cfg: ReconstructConfig, hf: Any, windows: torch.Tensor, fit: ReconstructionFit, res: dict[str, Any],
                 by_label: dict[str, Any], sweep_labels: list[str], kw: dict[str, Any], phases: Phases,
                 say: Any) -> None:
    """Run each swept method as drop-in attention and measure the change of the model's outputs (rank 0)."""
    from .approx import output_effect

    res["dropin"] = []
    for lab in dict.fromkeys(sweep_labels):
        m0 = by_label[lab]
        m = make_methods(fit, [m0.combo], cfg.budget, **{**kw, "proxy_rank": m0.proxy_rank})[0]
        with phases("dropin"):
            d = output_effect(hf, windows, m, cfg.layers, cfg.batch_size, seed=cfg.seed, heads=cfg.heads)
        res["dropin"].append({**d, "compute": method_cost(m, hf.head_dim)["compute"]})
    say("drop-in" + dropin_scope(res["dropin"][0]) + ": " + "; ".join(
        f"{d['method']}: hidden cos {d['hidden_cosine']:.4f}, sentence cos {d['sentence_cosine']:.4f}"
        for d in res["dropin"]))


def _write_run(run: RunDir, cfg: ReconstructConfig, res: dict[str, Any], tensors: dict[str, torch.Tensor],
               L: list[int], H: list[int]) -> None:
    """Write the tensors, the config, the plots and the section (keeping a stored 'train' comparison)."""
    write_tensors(run.file(TENSORS), tensors, {"model": cfg.model, "seq_len": cfg.seq_len, "layers": L, "heads": H})
    run.write_config(SECTION, asdict(cfg))
    prev = run.section(SECTION) or {}
    if "train" in prev:
        res["train"] = prev["train"]
    from .plots import plot_reconstruct

    res["plots"] = plot_reconstruct(run, res)
    run.write_section(SECTION, res)


def dropin_scope(d: dict[str, Any]) -> str:
    """'' when the drop-in replaced every head, else ' (heads [0, 1] reconstructed, heads [2, 3] exact)'."""
    if not d.get("exact_heads"):
        return ""
    return f" (--heads: heads {d['heads']} reconstructed, heads {d['exact_heads']} kept exact)"


def train(out: str | Path, progress: bool = True, resume: bool = False, **settings: Any) -> dict[str, Any]:
    """Run the training comparison and store it under 'train' in the reconstruct section. Every finished training
    run is checkpointed in ``out``; ``resume`` continues an interrupted comparison with the same settings."""
    from .train import PARTIAL, train_compare

    run = RunDir(out)
    res = train_compare(progress=progress, checkpoint=run.file(PARTIAL), resume=resume, **settings)
    sec = run.section(SECTION) or {}
    sec["train"] = res
    from .plots import plot_reconstruct

    sec["plots"] = sorted(set(sec.get("plots", [])) | set(plot_reconstruct(run, {"train": res})))
    run.write_section(SECTION, sec)
    run.file(PARTIAL).unlink(missing_ok=True)
    return res


def format_table(table: dict[str, Any]) -> str:
    """Plain-text table: TV per layer, worst layer, rel. error, top-1, pair budget and total compute per method
    (sorted by worst-layer TV)."""
    layers = sorted(next(iter(table.values()))["per_layer"], key=int)
    head = (f"{'method':30s} " + " ".join(f"TV L{l:<3s}" for l in layers)
            + "  maxTV   relErr  top1   KL     pairs compute")
    lines = [head, "-" * len(head)]
    for lab in sorted(table, key=lambda k: max(v["tv"] for v in table[k]["per_layer"].values())):
        v = table[lab]
        tv = [v["per_layer"][l]["tv"] for l in layers]
        rel = v["mean"]["rel_err"]
        comp = v["cost"]["compute"] if "cost" in v else float("nan")
        lines.append(f"{lab:30s} " + " ".join(f"{x:6.3f}" for x in tv) + f"  {max(tv):6.3f} "
                     f"{rel:7.3f}  {v['mean']['top1']:.3f} {v['mean']['kl']:6.3f}  {v['budget_pairs']:5d} {comp:7.3f}")
    return "\n".join(lines)
