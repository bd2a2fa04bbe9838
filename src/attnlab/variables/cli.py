"""`attnlab variables ...`: sample-complexity sweeps and single training runs on sparse Boolean tasks."""

from __future__ import annotations

import json
from typing import Annotated, List, Optional

import typer

from ..cli_config import QUIET_HELP
from ..cli_utils import HardenedGroup, write_report

app = typer.Typer(cls=HardenedGroup,
                  help="Variable creation (Edelman et al.): sparse Boolean tasks, m*(T) sweeps, law fits.",
                  no_args_is_help=True)

T_HELP = ("Context lengths T. Give them as --T 16 32 64, --T 16,32,64 or --T 16 --T 32 "
          "(bare integers after the options are added to --T).")

# Options shared by `sweep` and `train` (defaults stay on each parameter).
Task = Annotated[str, typer.Option(help="Boolean function: parity | and | or | majority | random.")]
Balanced = Annotated[bool, typer.Option(help="Sample labels 50/50 (relevant bits uniform per label).")]
Noise = Annotated[float, typer.Option(help="Probability of flipping each training label, in [0, 0.5).")]
DModel = Annotated[int, typer.Option(help="Model width (hidden size).")]
NHeads = Annotated[int, typer.Option(help="Attention heads per layer.")]
NLayers = Annotated[int, typer.Option(help="Number of transformer blocks (--model transformer).")]
Attention = Annotated[str, typer.Option(help="softmax | entmax | sparsemax.")]
Lr = Annotated[float, typer.Option(help="Adam learning rate.")]
BatchSize = Annotated[int, typer.Option(help="Training examples per optimiser step.")]
MaxSteps = Annotated[int, typer.Option(help="Optimiser steps at most per training run.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW decoupled weight decay.")]
NormMode = Annotated[str, typer.Option(help="Norm control: none | constrain (project each step) | penalty.")]
QkBound = Annotated[Optional[float], typer.Option(help="Bound on ||W_Q^h^T W_K^h||_F per head (constrain).")]
VBound = Annotated[Optional[float], typer.Option(help="Bound on ||W_V||_F per layer (constrain).")]
OutBound = Annotated[Optional[float], typer.Option(help="Bound on the classifier's ||W_out||_F (constrain).")]
Penalty = Annotated[float, typer.Option(help="Coefficient of the summed norms added to the loss (penalty).")]
NTest = Annotated[int, typer.Option(help="Test (and validation) set size.")]
Monitor = Annotated[str, typer.Option(help="Early stopping on: val | test | train accuracy.")]
Device = Annotated[str, typer.Option(help="Where training runs: cpu, cuda, cuda:N or auto (cuda if available).")]
Quiet = Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)]


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


def _configs(d_model: int, n_heads: int, n_layers: int, attention: str, lr: float,
             batch_size: int, max_steps: int, weight_decay: float, norm_mode: str, qk_bound: Optional[float],
             v_bound: Optional[float], out_bound: Optional[float], penalty: float, n_test: int, monitor: str):
    """Build the TrainConfig from CLI options."""
    from .train import NormControl, TrainConfig

    norm = NormControl(mode=norm_mode, qk_bound=qk_bound, v_bound=v_bound, out_bound=out_bound, penalty=penalty)
    return TrainConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, attention=attention, lr=lr,
                       batch_size=batch_size, max_steps=max_steps, weight_decay=weight_decay, norm=norm,
                       n_test=n_test, n_val=n_test, monitor=monitor)


ModelOpt = Annotated[str, typer.Option(
    "--model", help="bounded (default: the norm-bounded one-layer attention head the log T theorem covers; every "
    "norm projected after each step) | transformer (SmallTransformer with LayerNorm, biases, MLP; norms only as "
    "--norm-mode sets them).")]
EmbBound = Annotated[float, typer.Option(help="Bounded model: bound on every token/position embedding row's norm.")]


@app.command(context_settings={"allow_extra_args": True})
def sweep(
    ctx: typer.Context,
    task: Task = "and",
    s: int = typer.Option(3, "--s", help="Number of relevant (hidden) bits; must be <= every T."),
    T: List[str] = typer.Option([str(t) for t in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)], "--T",
                                help=T_HELP + " The law fits need at least 5 values with a reached m*."),
    seeds: int = typer.Option(5, help="Number of seeds (seed, seed+1, ...); each changes positions, data and init."),
    seed: int = typer.Option(0, help="First random seed (the seeds are seed, seed+1, ...)."),
    threshold: float = typer.Option(0.95, help="Test accuracy that counts as learned, in (0, 1]."),
    m_min: int = typer.Option(8, help="First train size tried by the doubling search."),
    m_max: int = typer.Option(65536, help="Largest train size tried; beyond it a seed is 'not learned up to m_max'."),
    rtol: float = typer.Option(0.05, help="Refinement stops when (hi - lo) <= rtol * hi per seed; 0 = exact."),
    points: int = typer.Option(4, help="Train sizes tried inside each seed's bracket per refinement round."),
    doubling: int = typer.Option(8, help="Train sizes per doubling round (m, 2m, ...) before a seed first succeeds."),
    balanced: Balanced = True,
    noise: Noise = 0.0,
    model: ModelOpt = "bounded",
    contrast: str = typer.Option("mlp", help="Contrast learner on the same tasks and protocol: mlp (ReLU MLP on the "
                                             "flattened bits, SGD) | none."),
    contrast_max_t: Optional[int] = typer.Option(None, "--contrast-max-T", help="Run the contrast only for T <= this."),
    d_model: Optional[int] = typer.Option(None, help="Model width (default 32 bounded, 64 transformer)."),
    n_heads: Optional[int] = typer.Option(None, help="Attention heads (default 1 bounded, 2 transformer)."),
    n_layers: NLayers = 1,
    attention: Attention = "softmax",
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 1e-2 bounded, 1e-3 transformer)."),
    batch_size: BatchSize = 64,
    max_steps: Optional[int] = typer.Option(None, help="Optimiser steps at most per run (default 1500 bounded, "
                                                       "2000 transformer)."),
    restarts: int = typer.Option(2, help="Bounded/MLP: re-initialisations of a trial that does not fit its training "
                                         "set (0 = one attempt); every attempt gets --max-steps."),
    lr_grid: List[str] = typer.Option([], "--lr-grid", help="Bounded/MLP: attempt k trains at the k-th rate (cyclic), "
                                                            "e.g. --lr-grid 0.01,0.003; default: --lr only."),
    fit_acc: float = typer.Option(1.0, help="A trial fits when its accuracy on all m training examples is >= this; "
                                            "m* counts only fitting trials."),
    weight_decay: WeightDecay = 0.01,
    norm_mode: NormMode = "none",
    emb_bound: EmbBound = 1.0,
    qk_bound: float = typer.Option(16.0, help="Bound on ||W_Q^h^T W_K^h||_F per head (bounded; transformer with "
                                              "--norm-mode constrain)."),
    v_bound: float = typer.Option(4.0, help="Bound on ||W_V||_F (bounded; transformer with constrain)."),
    out_bound: float = typer.Option(4.0, help="Bound on the classifier's ||W_c||_F (bounded; transformer with constrain)."),
    penalty: Penalty = 0.0,
    norm_sweep: List[str] = typer.Option([], "--norm-sweep", help="qk bounds for the norm/sample trade-off at --norm-T "
                                                                  "(e.g. --norm-sweep 2,4,8,16)."),
    norm_t: Optional[int] = typer.Option(None, "--norm-T", help="T of the norm sweep (default: the median --T)."),
    n_test: NTest = 1000,
    monitor: Monitor = "val",
    probe: bool = typer.Option(True, help="Probe the readout attention at the largest T reached."),
    probe_bounds: List[str] = typer.Option([], "--probe-bounds", help="qk bounds of the attention probe against the "
                                                                      "norm bound (e.g. --probe-bounds 1,2,4,8,16)."),
    probe_t: Optional[int] = typer.Option(None, "--probe-T", help="T of that probe (default: the largest reached T)."),
    probe_m: Optional[int] = typer.Option(None, "--probe-m", help="Train size of that probe (default: 2 x m* there)."),
    budget_s: Optional[float] = typer.Option(None, help="Start no new T after this many seconds."),
    out: str = typer.Option("runs/variables", help="Run directory (results.json section 'variables', PNGs)."),
    resume: bool = typer.Option(False, help="Reuse finished (T, m, seed) trials from the run directory."),
    device: Device = "cpu",
    quiet: Quiet = False,
) -> None:
    """Find m*(T) per seed (median, bootstrap CI) for the model and a contrast learner; fit log vs power laws."""
    from ..errors import ConfigError
    from .complexity import SearchConfig
    from .ensemble import Bounds, EnsembleConfig
    from .experiment import SweepConfig, run_sweep

    Ts = parse_ints(T, ctx.args)
    sweep_bounds = []
    for v in norm_sweep:
        for part in str(v).replace(",", " ").split():
            try:
                sweep_bounds.append(float(part))
            except ValueError:
                raise ConfigError(f"--norm-sweep: {part!r} is not a number") from None
    if any(not b > 0 for b in sweep_bounds):
        raise ConfigError(f"--norm-sweep bounds must be > 0 (got {sweep_bounds})")
    grid = [float(v) for v in parse_ints(lr_grid, [], "--lr-grid", float)]
    pbounds = [float(v) for v in parse_ints(probe_bounds, [], "--probe-bounds", float)]
    given = {k: v for k, v in (("d_model", d_model), ("n_heads", n_heads), ("lr", lr), ("max_steps", max_steps))
             if v is not None}
    bounded = EnsembleConfig(kind="bounded", batch_size=batch_size, restarts=restarts, n_test=n_test, lr_grid=grid,
                             bounds=Bounds(emb=emb_bound, qk=qk_bound, v=v_bound, out=out_bound), **given)
    mlp = EnsembleConfig(kind="mlp", lr=0.05, batch_size=batch_size, restarts=restarts, n_test=n_test,
                         **{k: v for k, v in given.items() if k == "max_steps"})
    train = _configs(given.get("d_model", 64), given.get("n_heads", 2), n_layers, attention, given.get("lr", 1e-3),
                     batch_size, given.get("max_steps", 2000), weight_decay, norm_mode,
                     qk_bound if norm_mode == "constrain" else None, v_bound if norm_mode == "constrain" else None,
                     out_bound if norm_mode == "constrain" else None, penalty, n_test, monitor)
    search = SearchConfig(threshold=threshold, m_min=m_min, m_max=m_max, rtol=rtol, points=points, doubling=doubling)
    cfg = SweepConfig(task=task, s=s, Ts=Ts, seeds=seeds, seed=seed, balanced=balanced, noise=noise, model=model,
                      bounded=bounded, train=train, contrast=contrast, mlp=mlp, contrast_max_T=contrast_max_t,
                      search=search, norm_sweep=sweep_bounds, norm_T=norm_t, probe=probe, budget_s=budget_s,
                      probe_bounds=pbounds, probe_T=probe_t, probe_m=probe_m,
                      fit_acc=fit_acc)
    section = run_sweep(cfg, out, device=device, resume=resume, log=None if quiet else typer.echo)
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
    quiet: Quiet = False,
) -> None:
    """Train one model on m examples; print accuracies, norms and the readout-attention probe as JSON."""
    from .probe import attention_probe
    from .tasks import make_task
    from .train import train_model

    t = make_task(task, T, s, seed, balanced, noise)
    cfg = _configs(d_model, n_heads, n_layers, attention, lr, batch_size, max_steps, weight_decay,
                   norm_mode, qk_bound, v_bound, out_bound, penalty, n_test, monitor)
    _check_memory(T, cfg)
    r = train_model(t, m, cfg, device=device, seed=seed)
    d = r.to_dict()
    d.pop("history")
    d["relevant_tokens"] = list(t.relevant_tokens)
    d["probe"] = {k: v for k, v in attention_probe(r.model, t).items() if k in ("mass", "topk_precision", "support_recall")}
    typer.echo(json.dumps(d, indent=2))
