"""`attnlab variables ...`: sample-complexity sweeps and single training runs on sparse Boolean tasks."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from ..cli_utils import fail

app = typer.Typer(help="Variable creation (Edelman et al.): sparse Boolean tasks, m*(T) sweeps, law fits.",
                  no_args_is_help=True)

T_HELP = ("Context lengths T. Give them as --T 16 32 64, --T 16,32,64 or --T 16 --T 32 "
          "(bare integers after the options are added to --T).")


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


def _configs(s: int, task: str, d_model: int, n_heads: int, n_layers: int, attention: str, lr: float,
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
    task: str = typer.Option("and", help="Boolean function: parity | and | or | majority | random."),
    s: int = typer.Option(3, "--s", help="Number of relevant (hidden) bits; must be <= every T."),
    T: List[str] = typer.Option(["16", "32", "64", "128"], "--T", help=T_HELP),
    seeds: int = typer.Option(3, help="Number of seeds (seed, seed+1, ...); each changes positions, data and init."),
    seed: int = typer.Option(0, help="First seed."),
    threshold: float = typer.Option(0.95, help="Test accuracy that counts as learned, in (0, 1]."),
    share: float = typer.Option(0.5, help="Fraction of seeds that must reach --threshold, in (0, 1]."),
    m_min: int = typer.Option(8, help="First train size tried by the doubling search."),
    m_max: int = typer.Option(65536, help="Largest train size tried; m* is reported as not reached beyond it."),
    rtol: float = typer.Option(0.1, help="Bisection stops when (hi - lo) <= rtol * hi; 0 = exact."),
    balanced: bool = typer.Option(True, help="Sample labels 50/50 (relevant bits uniform per label)."),
    noise: float = typer.Option(0.0, help="Probability of flipping each training label, in [0, 0.5)."),
    d_model: int = typer.Option(64, help="Model width."),
    n_heads: int = typer.Option(2, help="Attention heads."),
    n_layers: int = typer.Option(1, help="Transformer blocks."),
    attention: str = typer.Option("softmax", help="softmax | entmax | sparsemax."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    batch_size: int = typer.Option(64, help="Minibatch size."),
    max_steps: int = typer.Option(2000, help="Optimiser steps at most per trial."),
    weight_decay: float = typer.Option(0.01, help="AdamW decoupled weight decay."),
    norm_mode: str = typer.Option("none", help="Norm control: none | constrain (project each step) | penalty."),
    qk_bound: Optional[float] = typer.Option(None, help="Bound on ||W_Q^h^T W_K^h||_F per head (constrain)."),
    v_bound: Optional[float] = typer.Option(None, help="Bound on ||W_V||_F per layer (constrain)."),
    out_bound: Optional[float] = typer.Option(None, help="Bound on the classifier's ||W_out||_F (constrain)."),
    penalty: float = typer.Option(0.0, help="Coefficient of the summed norms added to the loss (penalty)."),
    n_test: int = typer.Option(1000, help="Test (and validation) set size."),
    monitor: str = typer.Option("val", help="Early stopping on: val | test | train accuracy."),
    probe: bool = typer.Option(True, help="Probe the readout attention at the largest T reached."),
    budget_s: Optional[float] = typer.Option(None, help="Start no new T after this many seconds."),
    out: str = typer.Option("runs/variables", help="Run directory (results.json section 'variables', PNGs)."),
    resume: bool = typer.Option(False, help="Reuse finished (T, m, seed) trials from the run directory."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto."),
) -> None:
    """Find m*(T), the smallest train size reaching --threshold, for each T; fit a + b log T vs a + b T^c."""
    from ..errors import AttnlabError
    from .complexity import SearchConfig
    from .experiment import SweepConfig, run_sweep

    try:
        Ts = parse_ints(T, ctx.args)
        train = _configs(s, task, d_model, n_heads, n_layers, attention, lr, batch_size, max_steps, weight_decay,
                         norm_mode, qk_bound, v_bound, out_bound, penalty, n_test, monitor)
        search = SearchConfig(threshold=threshold, share=share, m_min=m_min, m_max=m_max, rtol=rtol)
        cfg = SweepConfig(task=task, s=s, Ts=Ts, seeds=seeds, seed=seed, balanced=balanced, noise=noise,
                          train=train, search=search, probe=probe, budget_s=budget_s)
        section = run_sweep(cfg, out, device=device, resume=resume, log=typer.echo)
    except AttnlabError as e:
        fail(e)
    fits = section.get("fits")
    typer.echo(f"best law: {fits['best'] if fits else 'n/a'}; results in {out}/results.json (section 'variables')")


@app.command()
def train(
    task: str = typer.Option("and", help="Boolean function: parity | and | or | majority | random."),
    s: int = typer.Option(3, "--s", help="Number of relevant bits."),
    T: int = typer.Option(16, "--T", help="Context length (number of bits)."),
    m: int = typer.Option(256, "--m", help="Training-set size."),
    seed: int = typer.Option(0, help="Seed (positions, data, init)."),
    balanced: bool = typer.Option(True, help="Sample labels 50/50."),
    noise: float = typer.Option(0.0, help="Training label-flip probability."),
    d_model: int = typer.Option(64, help="Model width."),
    n_heads: int = typer.Option(2, help="Attention heads."),
    n_layers: int = typer.Option(1, help="Transformer blocks."),
    attention: str = typer.Option("softmax", help="softmax | entmax | sparsemax."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    batch_size: int = typer.Option(64, help="Minibatch size."),
    max_steps: int = typer.Option(2000, help="Optimiser steps at most."),
    weight_decay: float = typer.Option(0.01, help="AdamW decoupled weight decay."),
    norm_mode: str = typer.Option("none", help="none | constrain | penalty."),
    qk_bound: Optional[float] = typer.Option(None, help="Bound on ||W_Q^h^T W_K^h||_F per head."),
    v_bound: Optional[float] = typer.Option(None, help="Bound on ||W_V||_F per layer."),
    out_bound: Optional[float] = typer.Option(None, help="Bound on ||W_out||_F."),
    penalty: float = typer.Option(0.0, help="Norm penalty coefficient."),
    n_test: int = typer.Option(1000, help="Test (and validation) set size."),
    monitor: str = typer.Option("val", help="Early stopping on: val | test | train accuracy."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto."),
) -> None:
    """Train one model on m examples; print accuracies, norms and the readout-attention probe as JSON."""
    from ..errors import AttnlabError
    from .probe import attention_probe
    from .tasks import make_task
    from .train import train_model

    try:
        t = make_task(task, T, s, seed, balanced, noise)
        cfg = _configs(s, task, d_model, n_heads, n_layers, attention, lr, batch_size, max_steps, weight_decay,
                       norm_mode, qk_bound, v_bound, out_bound, penalty, n_test, monitor)
        r = train_model(t, m, cfg, device=device, seed=seed)
    except AttnlabError as e:
        fail(e)
    d = r.to_dict()
    d.pop("history")
    d["relevant_tokens"] = list(t.relevant_tokens)
    d["probe"] = {k: v for k, v in attention_probe(r.model, t).items() if k in ("mass", "topk_precision", "support_recall")}
    typer.echo(json.dumps(d, indent=2))
