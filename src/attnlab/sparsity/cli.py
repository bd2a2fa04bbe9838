"""`attnlab sparsity ...`: train entmax models, sweep sparsity predictors, print Pareto tables."""

from __future__ import annotations

from typing import Optional

import typer

from ..cli_config import config_command, option, out_option, quiet_option
from ..cli_utils import HardenedGroup, fail, out_files, write_report

app = typer.Typer(cls=HardenedGroup,
                  help="Sparsefinder: entmax gold graphs, learned sparsity predictors, Pareto evaluation.",
                  no_args_is_help=True)


TRAIN = "attnlab.sparsity.train_entmax:EntmaxTrainConfig"
RUN = "attnlab.sparsity.run:sparsity"
TRAIN_HELP = {"alpha": "entmax alpha (> 1; 1.5 = exact entmax15, 2 = sparsemax, else bisection)",
              "corpus": "Text file / folder / .jsonl (None: Python stdlib docstrings)",
              "vocab_size": "Compact vocabulary size (most frequent MiniLM-tokenizer ids)",
              "checkpoint_every": "Write a resumable partial training checkpoint every N steps (0 = never)",
              "d_model": "Model width (hidden size)", "n_layers": "Number of transformer layers",
              "steps": "Optimiser steps of the entmax training",
              "device": "Where training runs: cpu, cuda or cuda:N"}


@out_files(".safetensors", inside="entmax_model.safetensors")  # = sparsity.run.CHECKPOINT
def _train(settings: dict, out: str, resume: bool, quiet: bool) -> None:
    """Train a small entmax transformer on the corpus and save a checkpoint."""
    from pathlib import Path

    from ..errors import ResultsError
    from .run import CHECKPOINT
    from .train_entmax import EntmaxTrainConfig, load_small, partial_path, train_and_save

    run_dir = Path(out).suffix != ".safetensors"
    if run_dir:  # a run directory: the checkpoint goes inside it, where `sparsity run --out DIR --resume` finds it
        out = str(Path(out) / CHECKPOINT)  # (a foreign file there was refused with the --out lock: io.lock_output)
    cfg = EntmaxTrainConfig(**settings)
    if resume and Path(out).is_file() and not partial_path(out).exists():
        _, _, done, _ = load_small(out)
        skip = ("checkpoint_every",)
        if {k: v for k, v in vars(done).items() if k not in skip} != {k: v for k, v in vars(cfg).items() if k not in skip}:
            raise ResultsError(f"{out}: a finished model trained with other settings exists; re-run with its "
                               f"settings, another --out, or without --resume to overwrite it")
        typer.echo(f"{out}: already trained with these settings (resume); nothing to do")
        return
    _, _, hist = train_and_save(cfg, out, resume=resume, quiet=quiet)
    typer.echo(f"saved {out} (final loss {hist['loss'][-1]:.3f}, {hist['seconds']:.0f}s); next: attnlab sparsity run "
               f"--checkpoint {out} --out {Path(out).parent if run_dir else 'RUN'}")


config_command(app, "train", TRAIN, _train, help_extra=TRAIN_HELP,
               extra=[out_option("runs/sparsity", "Run directory to write entmax_model.safetensors into (a path "
                                                  "ending in .safetensors names the checkpoint file itself)"),
                      option("resume", bool, False, "--resume/--no-resume",
                             help="Continue an interrupted training from its partial checkpoint (<out stem>.partial"
                                  ".safetensors); a finished --out with the same settings is kept."),
                      quiet_option()])


def _run(settings: dict, out: str, resume: bool, quiet: bool, all_methods: bool = False) -> None:
    """Train/load an entmax model, fit every predictor, sweep operating points, downstream eval, plots."""
    from .run import sparsity
    from .train_entmax import EntmaxTrainConfig

    cfg = EntmaxTrainConfig(**settings[TRAIN])
    run_settings = dict(settings[RUN])
    from pathlib import Path

    if run_settings.get("checkpoint") and Path(run_settings["checkpoint"]).is_dir():  # a `sparsity train` run dir
        from .run import CHECKPOINT

        run_settings["checkpoint"] = str(Path(run_settings["checkpoint"]) / CHECKPOINT)
    if all_methods:
        from .predictors import METHODS

        run_settings["methods"] = list(METHODS)
    info = sparsity(out, train=cfg, seed=cfg.seed, resume=resume, quiet=quiet, **run_settings)
    from ..distributed import is_main_process

    if not is_main_process():  # torchrun: rank 0 prints and writes the report
        return
    _print_summary(info)
    write_report(out)


config_command(app, "run", [TRAIN, RUN], _run, skip=("out", "train", "resume", "quiet"),
               help_extra={**TRAIN_HELP,
                           "model": "'small' (our entmax transformer) or an HF model ('minilm') with entmax swapped in",
                           "checkpoint": "Load this small-model checkpoint (a file, or a `sparsity train` run "
                                         "directory) instead of training",
                           "methods": "Predictors (repeat or comma-separate; None: distance-knn, quantization, "
                                      "clustering, rank, window, bigbird, oracle-topk; --all adds distance-thr, lsh, "
                                      "routing, longformer, strided; also clustering-top2, quantization-fixed, "
                                      "quantization-dynamic (the authors' bucketings), strided-fixed, rank-knn)",
                           "n_fit": "Windows used to fit predictors", "n_eval": "Held-out windows for the sweeps",
                           "n_down": "Held-out windows for downstream evaluation (0 = skip)",
                           "rank": "Projection dimension r of the learned predictors",
                           "epochs": "Epochs of projection training (margin loss, Adam)",
                           "targets": "Sparsities of the downstream operating points",
                           "hf_seq_len": "Window length for an HF model",
                           "hf_finetune_steps": "Entmax self-distillation fine-tuning steps for an HF model (cached "
                                                "under $ATTNLAB_CACHE or ~/.cache/attnlab; 0 = entmax swapped in, "
                                                "untrained)",
                           "authors_defaults": "The public Sparsefinder code's defaults: forced window 3 (|i - j| <= 1) "
                                               "and [CLS] edges for every predictor",
                           "score_rank": "Rank of the 'rank' predictor's learned scorer",
                           "predictor_path": "Reuse fitted predictors (a run dir or its predictors.safetensors) instead "
                                             "of fitting; must match the model and sequence length",
                           "tokenizer": "Model folder / alias whose tokenizer reads the corpus for the small model",
                           "loss": "Projection loss: sum (Sparsefinder's per-query sums) | pair (per-pair hinge)",
                           "force_window": "Always predict edges with |i - j| <= this (-1 = off); counts in the metrics",
                           "force_cls": "Always predict edges to and from token 0 ([CLS])"},
               extra=[out_option("runs/sparsity", "Run directory (results.json section 'sparsity', PNGs, tensors)"),
                      option("resume", bool, False, "--resume/--no-resume",
                             help="Reuse a cached checkpoint / finished section in --out and continue an interrupted "
                                  "training from its partial checkpoint."),
                      quiet_option(),
                      option("all_methods", bool, False, "--all",
                             help="Evaluate every registered predictor (overrides --methods).")])


@app.command()
def table(out: str = typer.Option("runs/sparsity", help="Run directory with a 'sparsity' section."),
          all_points: bool = typer.Option(False, help="Print every operating point, not only the Pareto front.")):
    """Print the Pareto table of a finished run."""
    from ..errors import ResultsError

    from ..io import RunDir
    from .run import SECTION

    info = RunDir(out, create=False).section(SECTION)
    if not info:
        raise ResultsError(f"{out}: no '{SECTION}' section; run `attnlab sparsity run --out {out}` first")
    missing = [k for k in ("gold", "methods") if not isinstance(info.get(k), dict)]
    if missing or not isinstance(info["gold"].get("sparsity"), (int, float)):
        raise ResultsError(f"{out}: the '{SECTION}' section of results.json is damaged (missing "
                           f"{', '.join(missing) or 'gold.sparsity'}); re-run `attnlab sparsity run --out {out}`")
    _print_summary(info, all_points)


def _print_summary(info: dict, all_points: bool = False) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    from .run import pareto_table

    con = Console() if sys.stdout.isatty() else Console(width=240)  # piped: full-width tables, not 80 columns
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
