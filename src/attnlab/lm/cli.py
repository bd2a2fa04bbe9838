"""`attnlab lm ...`: train the reference byte-level long-context Llama."""

from __future__ import annotations

import typer

from ..cli_config import config_command, option, out_option, quiet_option
from ..cli_utils import HardenedGroup

app = typer.Typer(cls=HardenedGroup,
                  help="Reference trained long-context LM (byte-level Llama on the Python stdlib source).",
                  no_args_is_help=True)


def _train(settings: dict, out: str, preset: str, force: bool, quiet: bool) -> None:
    """Train (or load from the --out cache) the byte-level Llama; print train and held-out loss."""
    from .train import config_from, load_or_train

    cfg = config_from(preset, **settings)
    res = load_or_train(cfg, out, force=force, log=None if quiet else typer.echo)
    typer.echo(f"model: {res.path} ({'cached' if res.cached else 'trained'}, {res.steps} steps, "
               f"{res.seconds:.0f}s); train loss {res.train_loss:.4f}, held-out loss {res.heldout_loss:.4f} nats/byte")


config_command(app, "train", "attnlab.lm.train:LMConfig", _train,
               help_extra={"seq_len": "Training context length (tokens = bytes); the preset's unless given",
                           "steps": "Maximum optimizer steps", "max_seconds": "Training time budget; the LR schedule "
                           "follows it", "batch_size": "Windows per step", "d_model": "Model width",
                           "n_layers": "Layers", "n_heads": "Query heads",
                           "n_kv_heads": "Key/value heads (grouped-query attention)", "lr": "Peak AdamW learning rate",
                           "corpus": "Folder of .py files (None: this Python's stdlib)",
                           "max_bytes": "Read at most this many corpus bytes",
                           "device": "auto (cuda if available) | cpu | cuda", "seed": "Seed for init and data order"},
               extra=[out_option("runs/lm/stdlib-byte-llama", "HF model folder to write (also the cache: a folder "
                                 "trained with the same settings is reused)"),
                      option("preset", str, "gpu", "--preset", help="gpu (6x512, 16k context, <= 5 min on one GPU) | "
                             "tiny (seconds on CPU); its values are the defaults of every other option."),
                      option("force", bool, False, "--force", help="Retrain even if --out holds a model with the "
                             "same settings."),
                      quiet_option()])
