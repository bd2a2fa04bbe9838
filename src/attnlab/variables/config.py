"""The settings of the variable-creation experiment: :class:`SweepConfig` (what `run_sweep` runs) and the flat
settings of the two commands, :class:`SweepOptions` (`attnlab variables sweep`) and :class:`TrainOptions`
(`attnlab variables train`), whose fields are the commands' options (help = each field's comment).

A command option can feed several learners (``--d-model`` sizes the bounded head and the transformer,
``--qk-bound`` bounds the bounded head and, with ``--norm-mode constrain``, the transformer):
:meth:`SweepOptions.config` distributes them into the nested configs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from ..errors import ConfigError
from .complexity import SearchConfig
from .ensemble import EnsembleConfig
from .ensemble_models import Bounds
from .tasks import make_task
from .train import NormControl, TrainConfig

MODELS = ("bounded", "transformer")
CONTRASTS = ("mlp", "none")
DEFAULT_TS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
MLP_LR = 0.05  # SGD learning rate of the MLP contrast
# settings shared by the transformer's TrainConfig and the ensembles' EnsembleConfig
SHARED = ("d_model", "n_heads", "lr", "batch_size", "max_steps", "eval_every", "patience", "n_test")


@dataclass
class SweepConfig:
    """What to sweep: task, context lengths, seeds, the model (and contrast), training and search settings."""

    task: str = "and"  # parity | and | or | majority | random
    s: int = 3  # number of relevant bits
    Ts: list[int] = field(default_factory=lambda: list(DEFAULT_TS))  # context lengths
    seeds: int = 5  # seeds 0 .. seeds-1 (offset by seed)
    seed: int = 0  # first seed
    balanced: bool = True  # 50/50 labels
    noise: float = 0.0  # train label-flip probability
    model: str = "bounded"  # bounded (the theorem's norm-bounded class) | transformer (SmallTransformer)
    bounded: EnsembleConfig = field(default_factory=lambda: EnsembleConfig(kind="bounded", bounds=Bounds()))
    train: TrainConfig = field(default_factory=TrainConfig)  # the transformer's settings
    contrast: str = "mlp"  # mlp | none
    mlp: EnsembleConfig = field(default_factory=lambda: EnsembleConfig(kind="mlp", lr=MLP_LR))
    contrast_max_T: Optional[int] = None  # no contrast above this T (None = every T)
    search: SearchConfig = field(default_factory=SearchConfig)
    norm_sweep: list[float] = field(default_factory=list)  # qk bounds for the norm/sample trade-off
    norm_T: Optional[int] = None  # T of the trade-off sweep (default: the median --T)
    probe: bool = True  # probe attention at the largest T reached
    probe_bounds: list[float] = field(default_factory=list)  # qk bounds of the attention probe against the norm bound
    probe_T: Optional[int] = None  # T of that probe (default: the largest T with a reached m*)
    probe_m: Optional[int] = None  # train size of that probe (default: twice the median m* at probe_T)
    budget_s: Optional[float] = None  # start no new T after this many seconds
    max_members: int = 96  # largest ensemble trained at once (memory)
    fit_acc: Optional[float] = None  # fit criterion of every learner (train acc on all m examples); None: each config's own

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            given = dict(self.train)
            self.train = TrainConfig(**given)
            if isinstance(self.bounded, EnsembleConfig):  # shared keys given for the training apply to both
                self.bounded = EnsembleConfig(**{**asdict(self.bounded), **{k: v for k, v in given.items() if k in SHARED}})
        if isinstance(self.bounded, dict):
            self.bounded = EnsembleConfig(**{"kind": "bounded", "bounds": Bounds(), **self.bounded})
        if isinstance(self.mlp, dict):
            self.mlp = EnsembleConfig(**{"kind": "mlp", "lr": MLP_LR, **self.mlp})
        if isinstance(self.search, dict):
            self.search = SearchConfig(**self.search)
        if self.fit_acc is not None:  # one fit criterion for every learner
            if not 0 < self.fit_acc <= 1:
                raise ConfigError(f"--fit-acc must be in (0, 1] (got {self.fit_acc})")
            self.bounded = replace(self.bounded, fit_acc=self.fit_acc)
            self.mlp = replace(self.mlp, fit_acc=self.fit_acc)
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)} (got {self.model!r})")
        if self.contrast not in CONTRASTS:
            raise ConfigError(f"--contrast must be one of {', '.join(CONTRASTS)} (got {self.contrast!r})")
        if not self.Ts:
            raise ConfigError("--T: give at least one context length")
        for T in self.Ts:
            make_task(self.task, T, self.s, 0, self.balanced, self.noise)  # validates task, s, T, noise
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1 (got {self.seeds})")
        if any(not b > 0 for b in self.norm_sweep):
            raise ConfigError(f"--norm-sweep bounds must be > 0 (got {self.norm_sweep})")
        if self.norm_sweep and self.model != "bounded":
            raise ConfigError("--norm-sweep needs --model bounded")
        self.probe_bounds = [float(b) for b in self.probe_bounds]
        if any(not (math.isfinite(b) and b > 0) for b in self.probe_bounds):
            raise ConfigError(f"--probe-bounds must be finite and > 0 (got {self.probe_bounds})")
        if self.probe_bounds and self.model != "bounded":
            raise ConfigError("--probe-bounds needs --model bounded")
        if self.probe_T is not None:
            make_task(self.task, self.probe_T, self.s, 0)
        if self.probe_m is not None and self.probe_m < 1:
            raise ConfigError(f"--probe-m must be >= 1 (got {self.probe_m})")
        self.Ts = sorted(set(int(t) for t in self.Ts))
        if self.norm_T is not None:
            make_task(self.task, self.norm_T, self.s, 0, flag="--norm-T")
        if self.max_members < 1:
            raise ConfigError(f"--max-members must be >= 1 (got {self.max_members})")

    def seed_list(self) -> list[int]:
        """The seeds used."""
        return list(range(self.seed, self.seed + self.seeds))

    def fingerprint(self, learner: str) -> dict[str, Any]:
        """Settings a trial's outcome depends on (a resume must match them)."""
        base = {"task": self.task, "s": self.s, "balanced": self.balanced, "noise": self.noise, "learner": learner}
        if learner == "transformer":
            return {**base, "train": self.train.to_dict()}
        cfg = self.mlp if learner == "mlp" else self.bounded
        return {**base, "train": asdict(cfg)}


@dataclass
class SweepOptions:
    """The options of `attnlab variables sweep`; :meth:`config` builds the :class:`SweepConfig` they describe."""

    task: str = "and"  # Boolean function of the relevant bits: parity | and | or | majority | random
    s: int = 3  # number of relevant (hidden) bits; must be <= every T
    T: list[int] = field(default_factory=lambda: list(DEFAULT_TS))  # context lengths T, e.g. 16,32,64
    seeds: int = 5  # number of seeds (seed, seed+1, ...); each changes positions, data and init
    seed: int = 0  # first random seed (the seeds are seed, seed+1, ...)
    threshold: float = 0.95  # test accuracy that counts as learned, in (0, 1]
    m_min: int = 8  # first train size tried by the doubling search
    m_max: int = 65536  # largest train size tried; beyond it a seed is 'not learned up to m_max'
    rtol: float = 0.05  # refinement stops when (hi - lo) <= rtol * hi per seed; 0 = exact
    points: int = 4  # train sizes tried inside each seed's bracket per refinement round
    doubling: int = 8  # train sizes per doubling round (m, 2m, ...) before a seed first succeeds
    balanced: bool = True  # sample labels 50/50 (relevant bits uniform per label)
    noise: float = 0.0  # probability of flipping each training label, in [0, 0.5)
    model: str = "bounded"  # learner whose m*(T) is measured: bounded | transformer
    contrast: str = "mlp"  # contrast learner on the same tasks and protocol: mlp (ReLU MLP on the bits, SGD) | none
    contrast_max_t: Optional[int] = None  # run the contrast only for T <= this (None: every T)
    d_model: Optional[int] = None  # model width, the hidden size (None: 32 bounded, 64 transformer)
    n_heads: Optional[int] = None  # attention heads per layer (None: 1 bounded, 2 transformer)
    n_layers: int = 1  # number of transformer blocks (--model transformer)
    attention: str = "softmax"  # attention of --model transformer: softmax | entmax | sparsemax
    lr: Optional[float] = None  # Adam learning rate (None: 0.01 bounded, 0.001 transformer; the MLP uses 0.05)
    batch_size: int = 64  # training examples per optimiser step (every learner)
    max_steps: Optional[int] = None  # optimiser steps at most per run (None: 1500 bounded and MLP, 2000 transformer)
    restarts: int = 2  # bounded/MLP: new inits of a trial that misses its train set (0: one try; each --max-steps)
    lr_grid: list[float] = field(default_factory=list)  # bounded/MLP: attempt k trains at the k-th rate, e.g. 0.01,0.03
    fit_acc: float = 1.0  # a trial fits when its accuracy on all m training examples is >= this (m* counts fits only)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (--model transformer)
    norm_mode: str = "none"  # norm control of --model transformer: none | constrain (project each step) | penalty
    emb_bound: float = 1.0  # bounded model: bound on every token/position embedding row's norm
    qk_bound: float = 16.0  # bound on ||W_Q^h^T W_K^h||_F per head (bounded; transformer with --norm-mode constrain)
    v_bound: float = 4.0  # bound on ||W_V||_F (bounded; transformer with --norm-mode constrain)
    out_bound: float = 4.0  # bound on the classifier's ||W_c||_F (bounded; transformer with --norm-mode constrain)
    penalty: float = 0.0  # coefficient of the summed norms added to the loss (--norm-mode penalty)
    norm_sweep: list[float] = field(default_factory=list)  # norm/sample trade-off: m* at --norm-T for each qk bound
    norm_t: Optional[int] = None  # T of the norm sweep (None: the median --T)
    n_test: int = 1000  # test set size (and the transformer's validation set size)
    monitor: str = "val"  # early stopping of --model transformer on: val | test | train accuracy
    probe: bool = True  # probe the readout attention at the largest T reached
    probe_bounds: list[float] = field(default_factory=list)  # readout attention probe at these qk bounds, e.g. 1,4,16
    probe_t: Optional[int] = None  # T of that probe (None: the largest reached T)
    probe_m: Optional[int] = None  # train size of that probe (None: twice the median m* there)
    budget_s: Optional[float] = None  # start no new T after this many seconds (None: no time limit)
    device: str = "cpu"  # where training runs: cpu, cuda, cuda:N or auto (cuda if available)

    def config(self) -> SweepConfig:
        """The sweep these options describe: --d-model, --n-heads, --lr and --max-steps size both models (the MLP
        takes --max-steps only), the norm bounds go to the bounded head (and to the transformer when constrained)."""
        given = {k: getattr(self, k) for k in ("d_model", "n_heads", "lr", "max_steps") if getattr(self, k) is not None}
        bounds = Bounds(emb=self.emb_bound, qk=self.qk_bound, v=self.v_bound, out=self.out_bound)
        bounded = EnsembleConfig(kind="bounded", batch_size=self.batch_size, restarts=self.restarts, n_test=self.n_test,
                                 lr_grid=list(self.lr_grid), bounds=bounds, **given)
        mlp = EnsembleConfig(kind="mlp", lr=MLP_LR, batch_size=self.batch_size, restarts=self.restarts,
                             n_test=self.n_test, **{k: v for k, v in given.items() if k == "max_steps"})
        train = _train_config(self, self.norm_mode == "constrain", **given)
        search = SearchConfig(threshold=self.threshold, m_min=self.m_min, m_max=self.m_max, rtol=self.rtol,
                              points=self.points, doubling=self.doubling)
        return SweepConfig(task=self.task, s=self.s, Ts=list(self.T), seeds=self.seeds, seed=self.seed,
                           balanced=self.balanced, noise=self.noise, model=self.model, bounded=bounded, train=train,
                           contrast=self.contrast, mlp=mlp, contrast_max_T=self.contrast_max_t, search=search,
                           norm_sweep=list(self.norm_sweep), norm_T=self.norm_t, probe=self.probe,
                           budget_s=self.budget_s, probe_bounds=list(self.probe_bounds), probe_T=self.probe_t,
                           probe_m=self.probe_m, fit_acc=self.fit_acc)


@dataclass
class TrainOptions:
    """The options of `attnlab variables train` (one training run); :meth:`config` builds its :class:`TrainConfig`."""

    task: str = "and"  # Boolean function of the relevant bits: parity | and | or | majority | random
    s: int = 3  # number of relevant (hidden) bits; must be <= --T
    T: int = 16  # context length (number of input bits)
    m: int = 256  # training-set size (examples)
    seed: int = 0  # random seed of the relevant positions, the data and the initialisation
    balanced: bool = True  # sample labels 50/50 (relevant bits uniform per label)
    noise: float = 0.0  # probability of flipping each training label, in [0, 0.5)
    d_model: int = 64  # model width (hidden size)
    n_heads: int = 2  # attention heads per layer
    n_layers: int = 1  # number of transformer blocks
    attention: str = "softmax"  # attention normaliser: softmax | entmax | sparsemax
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 64  # training examples per optimiser step
    max_steps: int = 2000  # optimiser steps at most
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    norm_mode: str = "none"  # norm control: none | constrain (project each step) | penalty
    qk_bound: Optional[float] = None  # bound on ||W_Q^h^T W_K^h||_F per head, --norm-mode constrain (None: no bound)
    v_bound: Optional[float] = None  # bound on ||W_V||_F per layer, --norm-mode constrain (None: no bound)
    out_bound: Optional[float] = None  # bound on ||W_out||_F of the classifier, --norm-mode constrain (None: no bound)
    penalty: float = 0.0  # coefficient of the summed norms added to the loss (--norm-mode penalty)
    n_test: int = 1000  # size of the test set (and of the validation set)
    monitor: str = "val"  # early stopping on: val | test | train accuracy
    device: str = "cpu"  # where training runs: cpu, cuda, cuda:N or auto (cuda if available)

    def config(self) -> TrainConfig:
        """The model and optimiser settings of the run."""
        return _train_config(self, True, d_model=self.d_model, n_heads=self.n_heads, lr=self.lr,
                             max_steps=self.max_steps)


def _train_config(o: SweepOptions | TrainOptions, with_bounds: bool, **given: Any) -> TrainConfig:
    """The transformer's TrainConfig from a command's options (its norm bounds only ``with_bounds``)."""
    norm = NormControl(mode=o.norm_mode, qk_bound=o.qk_bound if with_bounds else None,
                       v_bound=o.v_bound if with_bounds else None, out_bound=o.out_bound if with_bounds else None,
                       penalty=o.penalty)
    return TrainConfig(n_layers=o.n_layers, attention=o.attention, batch_size=o.batch_size,
                       weight_decay=o.weight_decay, norm=norm, n_test=o.n_test, n_val=o.n_test, monitor=o.monitor,
                       **given)
