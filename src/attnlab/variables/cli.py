"""`attnlab variables ...`: sample-complexity sweeps and single training runs on sparse Boolean tasks."""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, List

import typer

from ..cli_config import config_command, option, out_option, quiet_option
from ..cli_utils import HardenedGroup, write_report

if TYPE_CHECKING:
    from .config import SweepOptions

app = typer.Typer(cls=HardenedGroup,
                  help="Variable creation (Edelman et al.): sparse Boolean tasks, m*(T) sweeps, law fits.",
                  no_args_is_help=True)

CONFIG = "attnlab.variables.config"
T_HELP = ("Context lengths T. Give them as --T 16 32 64, --T 16,32,64 or --T 16 --T 32 "
          "(bare integers after the options are added to --T).")
SWEEP_HELP = {
    "T": T_HELP + " The law fits need at least 5 values with a reached m*",
    "model": "bounded (the norm-bounded one-layer attention head the log T theorem covers; every norm projected "
             "after each step) | transformer (SmallTransformer with LayerNorm, biases, MLP; norms only as "
             "--norm-mode sets them)",
}
FLAGS = {"contrast_max_t": "--contrast-max-T", "norm_t": "--norm-T", "probe_t": "--probe-T", "probe_m": "--probe-m"}
WORDS = ("T", "lr_grid", "norm_sweep", "probe_bounds")  # list options parsed by _sweep (repeated, comma lists)


def parse_ints(values: List[str], extra: List[str], flag: str = "--T", kind: type = int) -> list:
    """Parse repeated / comma-separated / trailing integer (or ``kind``) values of a list option."""
    from ..errors import ConfigError

    out = []
    for v in [*values, *extra]:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(kind(part))
            except ValueError:
                raise ConfigError(f"{flag}: {part!r} is not {'an integer' if kind is int else 'a number'}") from None
    return out


def _check_memory(T: int, cfg) -> None:
    """Refuse a context length whose attention would not fit in memory (evaluation runs 1024 examples at once)."""
    from ..validate import attention_bytes, check_memory

    need = max(attention_bytes(cfg.batch_size, cfg.n_heads, T + 1, cfg.n_layers, factor=3.0),  # training step
               attention_bytes(min(1024, cfg.n_test), cfg.n_heads, T + 1, 1, factor=2.0))  # no-grad evaluation
    check_memory(need, f"--T {T}",
                 "lower --T (or --n-test / --batch-size / --n-heads)")


def _sweep_options(settings: dict, extra_args: List[str]) -> "SweepOptions":
    """The SweepOptions of the given options: list options parsed (bare integers after the options join --T)."""
    from ..errors import ConfigError
    from .config import DEFAULT_TS, SweepOptions

    lists = {"T": parse_ints(settings.get("T") or [str(t) for t in DEFAULT_TS], extra_args)}
    lists["norm_sweep"] = [float(v) for v in parse_ints(settings.get("norm_sweep", []), [], "--norm-sweep", float)]
    if any(not b > 0 for b in lists["norm_sweep"]):
        raise ConfigError(f"--norm-sweep bounds must be > 0 (got {lists['norm_sweep']})")
    for name in ("lr_grid", "probe_bounds"):
        flag = "--" + name.replace("_", "-")
        lists[name] = [float(v) for v in parse_ints(settings.get(name, []), [], flag, float)]
    return SweepOptions(**{**settings, **lists})


def _sweep(settings: dict, ctx: typer.Context, out: str, resume: bool, quiet: bool) -> None:
    """Find m*(T) per seed (median, bootstrap CI) for the model and a contrast learner; fit log vs power laws."""
    from ..errors import ConfigError
    from .experiment import run_sweep

    opts = _sweep_options(settings, ctx.args)
    section = run_sweep(opts.config(), out, device=opts.device, resume=resume, log=None if quiet else typer.echo)
    budget_s = opts.budget_s
    if section.get("skipped_T"):
        typer.secho(f"warning: --budget-s {budget_s:g} ran out; skipped T = {section['skipped_T']}", err=True)
    if not section["results"] and section.get("skipped_T"):
        raise ConfigError(f"--budget-s {budget_s:g}: no context length was run (it ran out before the first T); "
                          "raise --budget-s or leave it out")
    from ..distributed import is_main_process

    if not is_main_process():  # torchrun: rank 0 reports
        return
    fits = section.get("fits")
    verdict = f"{fits['verdict']} ({fits['reason']})" if fits else f"no fit ({section.get('fit_error')})"
    typer.echo(f"law: {verdict}; results in {out}/results.json (section 'variables')")
    write_report(out)


config_command(app, "sweep", f"{CONFIG}:SweepOptions", _sweep, help_extra=SWEEP_HELP, flags=FLAGS,
               kinds={name: "words" for name in WORDS}, shown={"lr_grid": "--lr only"},
               context_settings={"allow_extra_args": True},
               extra=[option("ctx", typer.Context, inspect.Parameter.empty),
                      out_option("runs/variables", "Run directory (results.json section 'variables', PNGs)"),
                      option("resume", bool, False, "--resume/--no-resume",
                             help="Continue an interrupted sweep: reuse the finished (T, m, seed) trials in --out "
                                  "(settings must match)."),
                      quiet_option()])


def _train(settings: dict, quiet: bool) -> None:
    """Train one model on m examples; print accuracies, norms and the readout-attention probe as JSON."""
    from .config import TrainOptions
    from .probe import attention_probe
    from .tasks import make_task
    from .train import train_model

    opts = TrainOptions(**settings)
    t = make_task(opts.task, opts.T, opts.s, opts.seed, opts.balanced, opts.noise)
    cfg = opts.config()
    _check_memory(opts.T, cfg)
    r = train_model(t, opts.m, cfg, device=opts.device, seed=opts.seed)
    d = r.to_dict()
    d.pop("history")
    d["relevant_tokens"] = list(t.relevant_tokens)
    d["probe"] = {k: v for k, v in attention_probe(r.model, t).items() if k in ("mass", "topk_precision", "support_recall")}
    typer.echo(json.dumps(d, indent=2))


config_command(app, "train", f"{CONFIG}:TrainOptions", _train, extra=[quiet_option()])
