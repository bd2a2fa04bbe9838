"""`attnlab lm ...`: train the reference byte-level long-context Llama."""

from __future__ import annotations

from typing import Optional

import typer

from ..cli_utils import fail

app = typer.Typer(help="Reference trained long-context LM (byte-level Llama on the Python stdlib source).",
                  no_args_is_help=True)


@app.command()
def train(
    out: str = typer.Option("runs/lm/stdlib-byte-llama", help="HF model folder to write (also the cache: a folder "
                            "trained with the same settings is reused)."),
    preset: str = typer.Option("gpu", help="gpu (6x512, 16k context, <= 5 min on one GPU) | tiny (seconds on CPU)."),
    seq_len: Optional[int] = typer.Option(None, help="Training context length (tokens = bytes)."),
    steps: Optional[int] = typer.Option(None, help="Maximum optimizer steps."),
    max_seconds: Optional[float] = typer.Option(None, help="Training time budget; the LR schedule follows it."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per step."),
    d_model: Optional[int] = typer.Option(None, help="Model width."),
    n_layers: Optional[int] = typer.Option(None, help="Layers."),
    n_heads: Optional[int] = typer.Option(None, help="Query heads."),
    n_kv_heads: Optional[int] = typer.Option(None, help="Key/value heads (grouped-query attention)."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate."),
    corpus: Optional[str] = typer.Option(None, help="Folder of .py files (default: this Python's stdlib)."),
    max_bytes: Optional[int] = typer.Option(None, help="Read at most this many corpus bytes."),
    device: str = typer.Option("auto", help="auto (cuda if available) | cpu | cuda."),
    seed: Optional[int] = typer.Option(None, help="Seed for init and data order."),
    force: bool = typer.Option(False, help="Retrain even if --out holds a model with the same settings."),
    quiet: bool = typer.Option(False, help="No progress output."),
):
    """Train (or load from the --out cache) the byte-level Llama; print train and held-out loss."""
    from ..errors import AttnlabError
    from .train import config_from, load_or_train

    try:
        cfg = config_from(preset, seq_len=seq_len, steps=steps, max_seconds=max_seconds, batch_size=batch_size,
                          d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, lr=lr,
                          corpus=corpus, max_bytes=max_bytes, device=device, seed=seed)
        res = load_or_train(cfg, out, force=force, log=None if quiet else typer.echo)
    except AttnlabError as e:
        fail(e)
    typer.echo(f"model: {res.path} ({'cached' if res.cached else 'trained'}, {res.steps} steps, "
               f"{res.seconds:.0f}s); train loss {res.train_loss:.4f}, held-out loss {res.heldout_loss:.4f} nats/byte")
