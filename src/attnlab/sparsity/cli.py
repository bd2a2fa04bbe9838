"""`attnlab sparsity ...`: train entmax models, sweep sparsity predictors, print Pareto tables."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..cli_utils import fail, split_words

app = typer.Typer(help="Sparsefinder: entmax gold graphs, learned sparsity predictors, Pareto evaluation.",
                  no_args_is_help=True)


def _train_cfg(objective, seq_len, vocab_size, d_model, n_heads, n_layers, alpha, learn_alpha, steps, batch_size, lr,
               max_windows, corpus, device, seed, checkpoint_every=100):
    from .train_entmax import EntmaxTrainConfig

    return EntmaxTrainConfig(objective=objective, seq_len=seq_len, vocab_size=vocab_size, d_model=d_model,
                             n_heads=n_heads, n_layers=n_layers, alpha=alpha, learn_alpha=learn_alpha, steps=steps,
                             batch_size=batch_size, lr=lr, max_windows=max_windows, corpus=corpus, device=device, seed=seed,
                             checkpoint_every=checkpoint_every)


OBJ = typer.Option("mlm", help="mlm (bidirectional encoder, masked LM) | clm (causal decoder, next token).")
SEQ = typer.Option(64, help="Tokens per window.")
VOC = typer.Option(4096, help="Compact vocabulary size (most frequent MiniLM-tokenizer ids).")
DM = typer.Option(128, help="Model width.")
NH = typer.Option(4, help="Heads per layer.")
NL = typer.Option(2, help="Layers.")
ALPHA = typer.Option(1.5, help="entmax alpha (> 1; 1.5 = exact entmax15, 2 = sparsemax, else bisection).")
LA = typer.Option(False, help="Learn one alpha per head.")
STEPS = typer.Option(600, help="Training steps.")
BS = typer.Option(32, help="Windows per training step.")
LR = typer.Option(1e-3, help="AdamW learning rate.")
MW = typer.Option(4000, help="Training windows read from the corpus.")
CORPUS = typer.Option(None, help="Text file / folder / .jsonl (default: Python stdlib docstrings).")
DEV = typer.Option("cpu", help="torch device (cpu, cuda).")
SEED = typer.Option(0, help="Seed for data, masking, init and predictors.")
CKE = typer.Option(100, help="Write a resumable partial training checkpoint every N steps (0 = never).")


@app.command()
def train(
    out: str = typer.Option("runs/sparsity/entmax_model.safetensors", help="Checkpoint file to write."),
    objective: str = OBJ, seq_len: int = SEQ, vocab_size: int = VOC, d_model: int = DM, n_heads: int = NH,
    n_layers: int = NL, alpha: float = ALPHA, learn_alpha: bool = LA, steps: int = STEPS, batch_size: int = BS,
    lr: float = LR, max_windows: int = MW, corpus: Optional[str] = CORPUS, device: str = DEV, seed: int = SEED,
    checkpoint_every: int = CKE,
    resume: bool = typer.Option(False, help="Continue an interrupted training from its partial checkpoint "
                                "(<out stem>.partial.safetensors); a finished --out with the same settings is kept."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Train a small entmax transformer on the corpus and save a checkpoint."""
    from pathlib import Path

    from ..errors import AttnlabError, ResultsError

    try:
        from .train_entmax import load_small, partial_path, train_and_save

        cfg = _train_cfg(objective, seq_len, vocab_size, d_model, n_heads, n_layers, alpha, learn_alpha, steps,
                         batch_size, lr, max_windows, corpus, device, seed, checkpoint_every)
        if resume and Path(out).is_file() and not partial_path(out).exists():
            _, _, done, _ = load_small(out)
            skip = ("checkpoint_every",)
            if {k: v for k, v in vars(done).items() if k not in skip} != {k: v for k, v in vars(cfg).items() if k not in skip}:
                raise ResultsError(f"{out}: a finished model trained with other settings exists; re-run with its "
                                   f"settings, another --out, or without --resume to overwrite it")
            typer.echo(f"{out}: already trained with these settings (resume); nothing to do")
            return
        _, _, hist = train_and_save(cfg, out, resume=resume, quiet=quiet)
        typer.echo(f"saved {out} (final loss {hist['loss'][-1]:.3f}, {hist['seconds']:.0f}s)")
    except AttnlabError as e:
        fail(e)


@app.command("run")
def run_cmd(
    out: str = typer.Option("runs/sparsity", help="Run directory (results.json section 'sparsity', PNGs, tensors)."),
    model: str = typer.Option("small", help="'small' (our entmax transformer) or an HF model ('minilm') with entmax swapped in."),
    checkpoint: Optional[str] = typer.Option(None, help="Load this small-model checkpoint instead of training."),
    methods: Optional[List[str]] = typer.Option(None, help="Methods (repeat or comma-separate); default all: distance-thr, "
                                                "distance-knn, quantization, clustering, window, bigbird, lsh, routing, "
                                                "oracle-topk, longformer, strided, rank. Also: clustering-top2, "
                                                "quantization-fixed, quantization-dynamic (the authors' bucketings), "
                                                "strided-fixed, rank-knn."),
    n_fit: int = typer.Option(128, help="Windows used to fit predictors."),
    n_eval: int = typer.Option(64, help="Held-out windows for the sweeps."),
    n_down: int = typer.Option(128, help="Held-out windows for downstream evaluation (0 = skip)."),
    rank: int = typer.Option(4, help="Projection dimension r of the learned predictors."),
    epochs: int = typer.Option(20, help="Epochs of projection training (margin loss, Adam)."),
    loss: str = typer.Option("sum", help="Projection loss: sum (Sparsefinder's per-query sums) | pair (per-pair hinge)."),
    force_window: int = typer.Option(-1, help="Always predict edges with |i - j| <= this (-1 = off); counts in the metrics."),
    force_cls: bool = typer.Option(False, help="Always predict edges to and from token 0 ([CLS])."),
    hf_seq_len: int = typer.Option(128, help="Window length for an HF model."),
    hf_finetune_steps: int = typer.Option(30, help="Entmax self-distillation fine-tuning steps for an HF model (cached "
                                          "under $ATTNLAB_CACHE or ~/.cache/attnlab; 0 = entmax swapped in untrained)."),
    authors_defaults: bool = typer.Option(False, help="The public Sparsefinder code's defaults: forced window 3 "
                                          "(|i - j| <= 1) and [CLS] edges for every predictor."),
    score_rank: int = typer.Option(4, help="Rank of the 'rank' predictor's learned scorer."),
    predictor_path: Optional[str] = typer.Option(None, help="Reuse fitted predictors (a run dir or its "
                                                 "predictors.safetensors) instead of fitting; must match the model and "
                                                 "sequence length."),
    resume: bool = typer.Option(True, help="Reuse a cached checkpoint / finished section in --out and continue an "
                                "interrupted training from its partial checkpoint."),
    quiet: bool = typer.Option(False, help="No progress output."),
    objective: str = OBJ, seq_len: int = SEQ, vocab_size: int = VOC, d_model: int = DM, n_heads: int = NH,
    n_layers: int = NL, alpha: float = ALPHA, learn_alpha: bool = LA, steps: int = STEPS, batch_size: int = BS,
    lr: float = LR, max_windows: int = MW, corpus: Optional[str] = CORPUS, device: str = DEV, seed: int = SEED,
    checkpoint_every: int = CKE,
):
    """Train/load an entmax model, fit every predictor, sweep operating points, downstream eval, plots."""
    from ..errors import AttnlabError

    try:
        from .run import sparsity

        cfg = _train_cfg(objective, seq_len, vocab_size, d_model, n_heads, n_layers, alpha, learn_alpha, steps,
                         batch_size, lr, max_windows, corpus, device, seed, checkpoint_every)
        info = sparsity(out, model, checkpoint, cfg, split_words(methods), n_fit, n_eval, n_down, rank, epochs, seed=seed,
                        resume=resume, hf_seq_len=hf_seq_len, hf_finetune_steps=hf_finetune_steps, loss=loss,
                        force_window=force_window, force_cls=force_cls, quiet=quiet, predictor_path=predictor_path,
                        authors_defaults=authors_defaults, score_rank=score_rank)
        _print_summary(info)
    except AttnlabError as e:
        fail(e)


@app.command()
def table(out: str = typer.Option("runs/sparsity", help="Run directory with a 'sparsity' section."),
          all_points: bool = typer.Option(False, help="Print every operating point, not only the Pareto front.")):
    """Print the Pareto table of a finished run."""
    from ..errors import AttnlabError, ResultsError

    try:
        from ..io import RunDir
        from .run import SECTION

        info = RunDir(out, create=False).section(SECTION)
        if not info:
            raise ResultsError(f"{out}: no '{SECTION}' section; run `attnlab sparsity run --out {out}` first")
        _print_summary(info, all_points)
    except AttnlabError as e:
        fail(e)


def _print_summary(info: dict, all_points: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from .run import pareto_table

    con = Console()
    t = Table(title=f"Sparsity predictors (gold sparsity {info['gold']['sparsity']:.3f})")
    for c in ("method", "knob", "sparsity", "recall", "exact", "cost", "comp.sparsity", "front"):
        t.add_column(c)
    for r in pareto_table(info):
        if all_points or r["front"] or r["front_cost"]:
            t.add_row(r["method"], r["knob"], *(f"{r[k]:.3f}" for k in ("sparsity", "recall", "exact", "cost",
                                                                       "comp_sparsity")),
                      "+".join(x for x, on in (("sparsity", r["front"]), ("cost", r["front_cost"])) if on))
    con.print(t)
    t2 = Table(title="Recall at sparsity 0.9")
    t2.add_column("method")
    t2.add_column("recall@0.9")
    t2.add_column("spread over windows (op. point nearest 0.9)")
    for m, v in info["recall_at_0.9"].items():
        w = info["methods"][m].get("windows_at_0.9", {}).get("recall")
        t2.add_row(m, "n/a" if v is None else f"{v:.3f}",
                   "" if not w else f"{w['mean']:.3f} +- {w['ci95']:.3f} (sd {w['std']:.3f}, {w['n']} windows)")
    con.print(t2)
    model = info.get("model", {})
    if model.get("gold_graphs_from"):
        con.print(f"gold graphs from: {model['gold_graphs_from']}")
    mlm = model.get("finetune", {}).get("mlm", {})
    if "entmax_finetuned" in mlm:
        con.print("MLM probe loss (held-out): " + ", ".join(f"{k} {v['loss']:.3f} +- {1.96 * v['loss_se']:.3f}"
                                                          for k, v in mlm.items() if isinstance(v, dict)))
    cmp = info.get("comparison") or {}
    if cmp.get("per_layer"):
        t3 = Table(title=f"Best learned ({cmp['best_learned']}) vs baselines and oracle, per layer")
        for c in ("layer", "recall@0.9", "oracle@0.9", "gap", "min margin vs baselines", "worst baseline point"):
            t3.add_column(c)
        f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        for r in cmp["per_layer"]:
            w = r.get("worst") or {}
            t3.add_row(str(r["layer"]), f(r["learned_recall_at_target"]), f(r.get("oracle_recall_at_target")),
                       f(r.get("gap_to_oracle")), f(r["min_margin"]),
                       f"{w.get('baseline', '')} @ {w.get('sparsity', float('nan')):.2f}" if w else "")
        con.print(t3)
    for w in info.get("warnings", []):
        con.print(f"warning: {w}")
