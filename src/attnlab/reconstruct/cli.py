"""`attnlab reconstruct ...`: fit + evaluate + drop-in (run), training comparison (train), fit only (fit)."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..cli_utils import fail, split_words, write_report

app = typer.Typer(help="Reconstruct attention scores from a subset of computed pairs (eigen-analysis paper).",
                  no_args_is_help=True)


@app.command()
def run(
    model: str = typer.Option("minilm", help="HF hub id (cached), local folder, or 'minilm'."),
    out: str = typer.Option("runs/reconstruct", help="Run directory (results.json section 'reconstruct', PNGs)."),
    budget: str = typer.Option("0.25", help="Exact pairs per row: a fraction in (0, 1] (0.25) or a count (32)."),
    budgets: List[str] = typer.Option(["0.0625", "0.125", "0.25", "0.5"], help="Budgets of the sweep (repeat or comma list)."),
    estimators: List[str] = typer.Option(["gaussian", "basis", "proxy+gaussian"],
                                         help="Estimators (comma list); all: gaussian, basis, mean, none, proxy, "
                                              "proxy+gaussian."),
    selections: List[str] = typer.Option(["random", "leverage", "adaptive", "oracle"],
                                         help="Selection strategies (comma list); all: random, fixed, evenly, local, "
                                              "leverage, qr, adaptive, oracle."),
    all_methods: bool = typer.Option(False, "--all", help="Evaluate every estimator x selection (overrides "
                                                          "--estimators/--selections)."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    n_fit: int = typer.Option(256, help="Windows of the fit split used to fit the statistics."),
    n_eval: int = typer.Option(64, help="Windows of the held-out split used to evaluate."),
    k: Optional[int] = typer.Option(None, help="Basis size of the basis estimator (default min(k90, budget)); <= budget."),
    ridge: float = typer.Option(1.0, help="Basis ridge multiplier (1 = Bayesian ridge, 0 = plain least squares)."),
    jitter: float = typer.Option(1e-5, help="Relative jitter added to observed-score covariances."),
    proxy: str = typer.Option("bilinear", help="Score proxy of the adaptive selection: bilinear | pca | random."),
    proxy_rank: int = typer.Option(4, help="Proxy rank r (costs r/d_head of a full score computation)."),
    position: bool = typer.Option(True, help="Also evaluate gaussian with query-position-conditioned statistics."),
    dropin: bool = typer.Option(True, help="Measure the model's output change with the best method as drop-in attention."),
    layers: Optional[List[str]] = typer.Option(None, help="Layers (default all)."),
    fit_path: Optional[str] = typer.Option(None, help="Reuse a saved fit (file or run dir) instead of fitting."),
    spectrum: Optional[str] = typer.Option(None, help="Take row statistics from an 'attnlab spectrum' run directory."),
    corpus: Optional[str] = typer.Option(None, help="Corpus file/dir/.jsonl (default: stdlib docstrings)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    seed: int = typer.Option(0, help="Seed of every random choice."),
) -> None:
    """Fit on the fit split, evaluate every estimator x selection on held-out text, sweep budgets, drop-in."""
    from ..errors import AttnlabError
    from .estimators import ALL_ESTIMATORS
    from .run import format_table, reconstruct
    from .selection import STRATEGIES, parse_budget

    if all_methods:
        estimators, selections = list(ALL_ESTIMATORS), list(STRATEGIES)

    try:
        res = reconstruct(out, model=model, budget=parse_budget(budget),
                          budgets=[parse_budget(b) for b in split_words(budgets) or []],
                          estimators=split_words(estimators), selections=split_words(selections), seq_len=seq_len, n_fit=n_fit,
                          n_eval=n_eval, k=k, ridge=ridge, jitter=jitter, proxy=proxy, proxy_rank=proxy_rank,
                          position=position, dropin=dropin, layers=[int(x) for x in split_words(layers)] if layers else None,
                          fit_path=fit_path, spectrum=spectrum, corpus=corpus, batch_size=batch_size, seed=seed)
    except AttnlabError as e:
        fail(e)
    typer.echo(format_table(res["table"]))
    typer.echo(f"best {res['best']}: worst-layer TV {res['best_worst_layer_tv']:.4f} (target 0.05); results in {out}")
    write_report(out)


@app.command()
def fit(
    model: str = typer.Option("minilm", help="HF hub id (cached), local folder, or 'minilm'."),
    out: str = typer.Option("runs/reconstruct/reconstruct_fit.safetensors", help="Output safetensors file."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    n_fit: int = typer.Option(256, help="Windows of the fit split."),
    corpus: Optional[str] = typer.Option(None, help="Corpus file/dir/.jsonl (default: stdlib docstrings)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    seed: int = typer.Option(0, help="Seed of the window choice."),
) -> None:
    """Fit and save the statistics only (reuse with `run --fit-path`)."""
    from ..errors import AttnlabError
    from .fit import fit_corpus

    try:
        f = fit_corpus(model, n_fit, seq_len, corpus=corpus, batch_size=batch_size, seed=seed)
        f.save(out)
    except AttnlabError as e:
        fail(e)
    typer.echo(f"saved {out}")


@app.command()
def train(
    out: str = typer.Option("runs/reconstruct", help="Run directory (stored under reconstruct.train)."),
    budgets: List[str] = typer.Option(["0.125", "0.25", "0.5"], help="Budgets (fractions or counts)."),
    selections: List[str] = typer.Option(["adaptive", "random"], help="Selection strategies compared."),
    estimator: str = typer.Option("gaussian", help="Estimator of the unselected pairs: gaussian | basis | mean | none | proxy | proxy+gaussian."),
    steps: int = typer.Option(300, help="Optimiser steps per run."),
    seq_len: int = typer.Option(64, help="Characters per window."),
    d_model: int = typer.Option(64, help="Model width."),
    n_layers: int = typer.Option(2, help="Blocks."),
    n_heads: int = typer.Option(4, help="Heads per layer."),
    batch_size: int = typer.Option(32, help="Windows per step."),
    lr: float = typer.Option(3e-3, help="AdamW learning rate."),
    refresh: int = typer.Option(50, help="Steps between refits of the estimator statistics."),
    proxy_rank: int = typer.Option(2, help="Proxy rank of the adaptive selection."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Train our small transformer (char LM) with reconstructed attention vs full attention; saves the curve."""
    from ..errors import AttnlabError
    from .run import train as run_train
    from .selection import parse_budget

    try:
        res = run_train(out, budgets=[parse_budget(b) for b in split_words(budgets)], selections=split_words(selections),
                        estimator=estimator, steps=steps, seq_len=seq_len, d_model=d_model, n_layers=n_layers,
                        n_heads=n_heads, batch_size=batch_size, lr=lr, refresh=refresh, proxy_rank=proxy_rank, seed=seed)
    except AttnlabError as e:
        fail(e)
    for r in res["runs"]:
        typer.echo(f"{r['label']:24s} budget {r['budget']}: held-out loss {r['heldout_loss']:.4f}")
    write_report(out)
