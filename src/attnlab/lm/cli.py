"""`attnlab lm ...`: train the reference byte-level long-context Llama."""

from __future__ import annotations

import typer

from ..cli_config import config_command, option, out_option, quiet_option, resume_option
from ..cli_utils import HardenedGroup

app = typer.Typer(cls=HardenedGroup,
                  help="Reference trained long-context LM (byte-level Llama on the Python stdlib source).",
                  no_args_is_help=True)


def _train(settings: dict, out: str, preset: str, force: bool, quiet: bool, resume: bool = False) -> None:
    """Train (or load from the --out cache) the byte-level Llama; print train and held-out loss."""
    from .train import config_from, load_or_train

    cfg = config_from(preset, **settings)
    res = load_or_train(cfg, out, force=force, log=None if quiet else typer.echo, resume=resume)
    typer.echo(f"model: {res.path} ({'cached' if res.cached else 'trained'}, {res.steps} steps, "
               f"{res.seconds:.0f}s); train loss {res.train_loss:.4f}, held-out loss {res.heldout_loss:.4f} nats/byte")


LM_HELP = {
    "seq_len": "Training context length in tokens (= bytes) for most of training",
    "long_seq_len": "Context length of the final --long-frac of training (length curriculum) and of the long "
                    "held-out evaluation",
    "long_frac": "Share of the training steps (the last ones) run at --long-seq-len; 0 = no long phase",
    "d_model": "Model width (hidden size of every layer)",
    "n_layers": "Number of transformer layers",
    "n_heads": "Query heads per attention layer",
    "n_kv_heads": "Key/value heads per layer (grouped-query attention; divides --n-heads)",
    "head_dim": "Dimension of each attention head (None: --d-model / --n-heads)",
    "d_ff": "Hidden size of each layer's SwiGLU feed-forward block",
    "rope_theta": "Base frequency theta of the rotary position embedding",
    "max_positions": "Longest context the saved model config accepts (max_position_embeddings)",
    "batch_size": "Windows per optimizer step",
    "lr": "Peak AdamW learning rate (linear warm-up, then cosine decay to 10% over --steps or "
          "--max-seconds, whichever ends first)",
    "weight_decay": "AdamW decoupled weight decay",
    "warmup_steps": "Optimizer steps of linear learning-rate warm-up",
    "steps": "Maximum optimizer steps (training also stops at --max-seconds)",
    "max_seconds": "Training time budget in seconds; the learning-rate schedule follows it",
    "eval_windows": "Held-out windows of the final train / held-out loss",
    "eval_every": "Log the held-out loss every this many steps (the overfitting curve) and write the checkpoint "
                  "--resume continues from (0 = neither)",
    "heldout_frac": "Share of the corpus files kept out of training for the held-out loss",
    "max_bytes": "Read at most this many corpus bytes (None: the whole corpus)",
    "corpus": "Folder of .py files to train on (None: this Python's standard library)",
    "device": "Where training runs: auto (cuda if available), cpu, cuda or cuda:N",
    "seed": "Random seed of the initialisation and the data order (same seed, same model)",
}


def preset_defaults(module: str = "attnlab.lm.train") -> dict[str, str]:
    """Default notes naming every preset where they differ ("512 (gpu), 64 (tiny)"), read from the module's source
    (``PRESETS = {"gpu": LMConfig(), "tiny": LMConfig(d_model=64, ...)}``) without importing torch."""
    import ast
    import importlib.util

    from ..cli_config import _constants, _value, config_fields, show_value

    fields = {f.name: f for f in config_fields(f"{module}:LMConfig")}
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    consts = _constants(tree)
    node = consts.get("PRESETS")
    if not isinstance(node, ast.Dict):
        return {}
    presets = {}
    for k, v in zip(node.keys, node.values):
        over = {kw.arg: _value(kw.value, consts) for kw in getattr(v, "keywords", [])}
        presets[k.value] = {name: over.get(name, fld.value) for name, fld in fields.items()}
    out = {}
    for name, fld in fields.items():
        none = {"head_dim": "d-model / n-heads"}.get(name, "all")
        values = {p: none if vals[name] is None else show_value(vals[name], fld.flag) for p, vals in presets.items()}
        if len(set(values.values())) > 1:
            out[name] = ", ".join(f"{v} ({p})" for p, v in values.items())
    return out


config_command(app, "train", "attnlab.lm.train:LMConfig", _train, help_extra=LM_HELP, shown=preset_defaults(),
               extra=[out_option("runs/lm/stdlib-byte-llama", "HF model folder to write (also the cache: a folder "
                                 "trained with the same settings is reused)"),
                      option("preset", str, "gpu", "--preset", help="Size preset: gpu (6x512, 16k context, <= 5 min on "
                             "one GPU) | gpu-8b-attn (8 layers, 32 q / 8 kv heads of 128: an 8B model's attention "
                             "geometry) | tiny | tiny-8b-attn (seconds on CPU); every option below defaults to the "
                             "preset's value."),
                      option("force", bool, False, "--force", help="Retrain even if --out holds a model with the "
                             "same settings."),
                      resume_option(), quiet_option()])
