"""`attnlab sparsity ...`: train entmax models, sweep sparsity predictors, print Pareto tables."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..cli_utils import fail, split_words, write_report

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
    methods: Optional[List[str]] = typer.Option(None, help="Methods (repeat or comma-separate); default: distance-knn, "
                                                "quantization, clustering, window, bigbird, oracle-topk. All (--all): "
                                                "also distance-thr, lsh, routing."),
    all_methods: bool = typer.Option(False, "--all", help="Evaluate every method (overrides --methods)."),
    n_fit: int = typer.Option(128, help="Windows used to fit predictors."),
    n_eval: int = typer.Option(64, help="Held-out windows for the sweeps."),
    n_down: int = typer.Option(128, help="Held-out windows for downstream evaluation (0 = skip)."),
    rank: int = typer.Option(4, help="Projection dimension r of the learned predictors."),
    epochs: int = typer.Option(20, help="Epochs of projection training (margin loss, Adam)."),
    loss: str = typer.Option("sum", help="Projection loss: sum (Sparsefinder's per-query sums) | pair (per-pair hinge)."),
    force_window: int = typer.Option(-1, help="Always predict edges with |i - j| <= this (-1 = off); counts in the metrics."),
    force_cls: bool = typer.Option(False, help="Always predict edges to and from token 0 ([CLS])."),
    hf_seq_len: int = typer.Option(128, help="Window length for an HF model."),
    hf_finetune_steps: int = typer.Option(0, help="Entmax distillation fine-tuning steps for an HF model (0 = none)."),
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
        from .predictors import METHODS

        info = sparsity(out, model, checkpoint, cfg, list(METHODS) if all_methods else split_words(methods), n_fit, n_eval, n_down, rank, epochs, seed=seed,
                        resume=resume, hf_seq_len=hf_seq_len, hf_finetune_steps=hf_finetune_steps, loss=loss,
                        force_window=force_window, force_cls=force_cls, quiet=quiet)
        _print_summary(info)
        write_report(out)
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
    for c in ("method", "knob", "sparsity", "recall", "exact", "efficiency"):
        t.add_column(c)
    for r in pareto_table(info):
        if all_points or r["front"]:
            t.add_row(r["method"], r["knob"], *(f"{r[k]:.3f}" for k in ("sparsity", "recall", "exact", "efficiency")))
    con.print(t)
    t2 = Table(title="Recall at sparsity 0.9")
    t2.add_column("method")
    t2.add_column("recall@0.9")
    for m, v in info["recall_at_0.9"].items():
        t2.add_row(m, "n/a" if v is None else f"{v:.3f}")
    con.print(t2)
