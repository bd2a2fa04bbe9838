"""`attnlab variables ...`: sample-complexity sweeps and single training runs on sparse Boolean tasks."""

from __future__ import annotations

import json
from typing import Annotated, List, Optional

import typer

from ..cli_utils import fail

app = typer.Typer(help="Variable creation (Edelman et al.): sparse Boolean tasks, m*(T) sweeps, law fits.",
                  no_args_is_help=True)

T_HELP = ("Context lengths T. Give them as --T 16 32 64, --T 16,32,64 or --T 16 --T 32 "
          "(bare integers after the options are added to --T).")

# Options shared by `sweep` and `train` (defaults stay on each parameter).
Task = Annotated[str, typer.Option(help="Boolean function: parity | and | or | majority | random.")]
Balanced = Annotated[bool, typer.Option(help="Sample labels 50/50 (relevant bits uniform per label).")]
Noise = Annotated[float, typer.Option(help="Probability of flipping each training label, in [0, 0.5).")]
DModel = Annotated[int, typer.Option(help="Model width.")]
NHeads = Annotated[int, typer.Option(help="Attention heads.")]
NLayers = Annotated[int, typer.Option(help="Transformer blocks.")]
Attention = Annotated[str, typer.Option(help="softmax | entmax | sparsemax.")]
Lr = Annotated[float, typer.Option(help="Adam learning rate.")]
BatchSize = Annotated[int, typer.Option(help="Minibatch size.")]
MaxSteps = Annotated[int, typer.Option(help="Optimiser steps at most per training run.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW decoupled weight decay.")]
NormMode = Annotated[str, typer.Option(help="Norm control: none | constrain (project each step) | penalty.")]
QkBound = Annotated[Optional[float], typer.Option(help="Bound on ||W_Q^h^T W_K^h||_F per head (constrain).")]
VBound = Annotated[Optional[float], typer.Option(help="Bound on ||W_V||_F per layer (constrain).")]
OutBound = Annotated[Optional[float], typer.Option(help="Bound on the classifier's ||W_out||_F (constrain).")]
Penalty = Annotated[float, typer.Option(help="Coefficient of the summed norms added to the loss (penalty).")]
NTest = Annotated[int, typer.Option(help="Test (and validation) set size.")]
Monitor = Annotated[str, typer.Option(help="Early stopping on: val | test | train accuracy.")]
Device = Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")]


def parse_ints(values: List[str], extra: List[str], flag: str = "--T") -> list[int]:
    """Parse repeated / comma-separated / trailing integer values of a list option."""
    from ..errors import ConfigError

    out = []
    for v in [*values, *extra]:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise ConfigError(f"{flag}: {part!r} is not an integer") from None
    return out


def _check_memory(T: int, cfg) -> None:
    """Refuse a context length whose attention would not fit in memory (evaluation runs 1024 examples at once)."""
    from ..validate import attention_bytes, check_memory

    need = max(attention_bytes(cfg.batch_size, cfg.n_heads, T + 1, cfg.n_layers, factor=3.0),  # training step
               attention_bytes(min(1024, cfg.n_test), cfg.n_heads, T + 1, 1, factor=2.0))  # no-grad evaluation
    check_memory(need, f"--T {T}",
                 "lower --T (or --n-test / --batch-size / --n-heads)")


def _configs(d_model: int, n_heads: int, n_layers: int, attention: str, lr: float,
             batch_size: int, max_steps: int, weight_decay: float, norm_mode: str, qk_bound: Optional[float],
             v_bound: Optional[float], out_bound: Optional[float], penalty: float, n_test: int, monitor: str):
    """Build the TrainConfig from CLI options."""
    from .train import NormControl, TrainConfig

    norm = NormControl(mode=norm_mode, qk_bound=qk_bound, v_bound=v_bound, out_bound=out_bound, penalty=penalty)
    return TrainConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, attention=attention, lr=lr,
                       batch_size=batch_size, max_steps=max_steps, weight_decay=weight_decay, norm=norm,
                       n_test=n_test, n_val=n_test, monitor=monitor)


@app.command(context_settings={"allow_extra_args": True})
def sweep(
    ctx: typer.Context,
    task: Task = "and",
    s: int = typer.Option(3, "--s", help="Number of relevant (hidden) bits; must be <= every T."),
    T: List[str] = typer.Option(["16", "32", "64", "128"], "--T", help=T_HELP),
    seeds: int = typer.Option(3, help="Number of seeds (seed, seed+1, ...); each changes positions, data and init."),
    seed: int = typer.Option(0, help="First seed."),
    threshold: float = typer.Option(0.95, help="Test accuracy that counts as learned, in (0, 1]."),
    share: float = typer.Option(0.5, help="Fraction of seeds that must reach --threshold, in (0, 1]."),
    m_min: int = typer.Option(8, help="First train size tried by the doubling search."),
    m_max: int = typer.Option(65536, help="Largest train size tried; m* is reported as not reached beyond it."),
    rtol: float = typer.Option(0.1, help="Bisection stops when (hi - lo) <= rtol * hi; 0 = exact."),
    balanced: Balanced = True,
    noise: Noise = 0.0,
    d_model: DModel = 64,
    n_heads: NHeads = 2,
    n_layers: NLayers = 1,
    attention: Attention = "softmax",
    lr: Lr = 1e-3,
    batch_size: BatchSize = 64,
    max_steps: MaxSteps = 2000,
    weight_decay: WeightDecay = 0.01,
    norm_mode: NormMode = "none",
    qk_bound: QkBound = None,
    v_bound: VBound = None,
    out_bound: OutBound = None,
    penalty: Penalty = 0.0,
    n_test: NTest = 1000,
    monitor: Monitor = "val",
    probe: bool = typer.Option(True, help="Probe the readout attention at the largest T reached."),
    budget_s: Optional[float] = typer.Option(None, help="Start no new T after this many seconds."),
    out: str = typer.Option("runs/variables", help="Run directory (results.json section 'variables', PNGs)."),
    resume: bool = typer.Option(False, help="Reuse finished (T, m, seed) trials from the run directory."),
    device: Device = "cpu",
) -> None:
    """Find m*(T), the smallest train size reaching --threshold, for each T; fit a + b log T vs a + b T^c."""
    from ..errors import AttnlabError, ConfigError
    from .complexity import SearchConfig
    from .experiment import SweepConfig, run_sweep

    try:
        Ts = parse_ints(T, ctx.args)
        train = _configs(d_model, n_heads, n_layers, attention, lr, batch_size, max_steps, weight_decay,
                         norm_mode, qk_bound, v_bound, out_bound, penalty, n_test, monitor)
        _check_memory(max(Ts, default=0), train)
        search = SearchConfig(threshold=threshold, share=share, m_min=m_min, m_max=m_max, rtol=rtol)
        cfg = SweepConfig(task=task, s=s, Ts=Ts, seeds=seeds, seed=seed, balanced=balanced, noise=noise,
                          train=train, search=search, probe=probe, budget_s=budget_s)
        section = run_sweep(cfg, out, device=device, resume=resume, log=typer.echo)
        if section.get("skipped_T"):
            typer.secho(f"warning: --budget-s {budget_s:g} ran out; skipped T = {section['skipped_T']}", err=True)
        if not section["results"] and section.get("skipped_T"):
            raise ConfigError(f"--budget-s {budget_s:g}: no context length was run (it ran out before the first T); "
                              "raise --budget-s or leave it out")
    except AttnlabError as e:
        fail(e)
    fits = section.get("fits")
    typer.echo(f"best law: {fits['best'] if fits else 'n/a'}; results in {out}/results.json (section 'variables')")


@app.command()
def train(
    task: Task = "and",
    s: int = typer.Option(3, "--s", help="Number of relevant bits."),
    T: int = typer.Option(16, "--T", help="Context length (number of bits)."),
    m: int = typer.Option(256, "--m", help="Training-set size."),
    seed: int = typer.Option(0, help="Seed (positions, data, init)."),
    balanced: Balanced = True,
    noise: Noise = 0.0,
    d_model: DModel = 64,
    n_heads: NHeads = 2,
    n_layers: NLayers = 1,
    attention: Attention = "softmax",
    lr: Lr = 1e-3,
    batch_size: BatchSize = 64,
    max_steps: MaxSteps = 2000,
    weight_decay: WeightDecay = 0.01,
    norm_mode: NormMode = "none",
    qk_bound: QkBound = None,
    v_bound: VBound = None,
    out_bound: OutBound = None,
    penalty: Penalty = 0.0,
    n_test: NTest = 1000,
    monitor: Monitor = "val",
    device: Device = "cpu",
) -> None:
    """Train one model on m examples; print accuracies, norms and the readout-attention probe as JSON."""
    from ..errors import AttnlabError
    from .probe import attention_probe
    from .tasks import make_task
    from .train import train_model

    try:
        t = make_task(task, T, s, seed, balanced, noise)
        cfg = _configs(d_model, n_heads, n_layers, attention, lr, batch_size, max_steps, weight_decay,
                       norm_mode, qk_bound, v_bound, out_bound, penalty, n_test, monitor)
        _check_memory(T, cfg)
        r = train_model(t, m, cfg, device=device, seed=seed)
    except AttnlabError as e:
        fail(e)
    d = r.to_dict()
    d.pop("history")
    d["relevant_tokens"] = list(t.relevant_tokens)
    d["probe"] = {k: v for k, v in attention_probe(r.model, t).items() if k in ("mass", "topk_precision", "support_recall")}
    typer.echo(json.dumps(d, indent=2))
