"""Settings of `attnlab reconstruct run` (:class:`ReconstructConfig`, one CLI flag per field) and the checks that
run before any work: values, proxy ranks against the model's head size, and the estimator x selection grid and
residual proxies the settings imply (read from the estimators' tags, never their names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from ..validate import check_fields
from .estimators import ALL_ESTIMATORS, estimator_kind
from .evaluate import Combo
from .selection import STRATEGIES, budget_count

# Focused default grid (the strongest estimators, the plain baseline, the adaptive method and the oracle bound);
# `--all` / estimators=ALL_ESTIMATORS, selections=STRATEGIES evaluates every combination.
DEFAULT_ESTIMATORS = ("gaussian", "basis", "proxy+gaussian")
DEFAULT_SELECTIONS = ("random", "leverage", "adaptive", "oracle")


@dataclass
class ReconstructConfig:
    """Settings of a reconstruct run (CLI flags have the same names)."""

    model: str = "minilm"  # HF hub id, local folder or 'minilm'
    corpus: Optional[str] = None  # None = stdlib docstrings
    seq_len: int = 128  # tokens per window
    n_fit: int = 256  # windows of the fit split used to fit the statistics
    n_eval: int = 64  # windows of the held-out split used to evaluate
    budget: float = 0.25  # pairs per row: fraction in (0, 1] or a count
    budgets: list = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5])  # sweep (empty = no sweep)
    estimators: list = field(default_factory=lambda: list(DEFAULT_ESTIMATORS))  # ALL_ESTIMATORS with --all
    selections: list = field(default_factory=lambda: list(DEFAULT_SELECTIONS))  # STRATEGIES with --all
    position: bool = True  # also evaluate gaussian with query-position-conditioned statistics
    pooled_baseline: bool = True  # also evaluate the naive basis LS with heads pooled and random pairs
    k: Optional[int] = None  # basis size (None: min(k90 of the head, budget))
    ridge: float = 1.0  # basis ridge multiplier (1 = Bayesian ridge)
    jitter: float = 1e-5  # relative jitter on observed-score covariances
    proxy: str = "bilinear"  # adaptive-selection proxy: bilinear | pca | random
    proxy_rank: int = 4  # proxy dimension r
    extra_ranks: list = field(default_factory=lambda: [8])  # also evaluate the adaptive proxy/gaussian rows at these r
    layers: Optional[list] = None  # None = all
    heads: Optional[list] = None  # None = all
    batch_size: int = 8
    topk: int = 5  # k of the top-k agreement metric
    dropin: bool = True  # run the best method as drop-in attention and measure output change
    fit_path: Optional[str] = None  # reuse a saved fit (file or run dir) instead of fitting
    spectrum: Optional[str] = None  # take row statistics from a spectrum run dir instead of fitting
    compute: Optional[float] = None  # choose 'best' at this total compute (fraction of dense QK^T), not at --budget
    frontier: bool = False  # evaluate the TV-vs-total-compute frontier (families x budgets x ranks); --compute implies it
    frontier_ranks: list = field(default_factory=lambda: [2, 4, 8])  # proxy ranks of the frontier
    frontier_budgets: list = field(default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2])  # pair fractions
    families: Optional[list] = None  # frontier method families (None = all of frontier.FAMILIES)
    chunks: int = 4  # groups of held-out windows for the frontier's spread
    device: str = "cpu"  # where the model and the estimators run: cpu, cuda or cuda:N (statistics stay float64)
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError on bad values (budget checked against seq_len)."""
        check_fields(self)
        from .cost import check_compute

        check_compute(self.compute)
        for n in ("seq_len", "n_fit", "n_eval", "batch_size", "topk", "proxy_rank", "chunks"):
            if getattr(self, n) < 1:
                raise ConfigError(f"--{n.replace('_', '-')} must be >= 1 (got {getattr(self, n)})")
        if self.topk >= self.seq_len:
            raise ConfigError(f"--topk {self.topk} must be below --seq-len {self.seq_len} (the top-k of a whole row "
                              "always agrees: the metric would read 1.0)")
        b = budget_count(self.budget, self.seq_len)
        for x in self.budgets:
            budget_count(x, self.seq_len, flag="--budgets")
        if not self.estimators or not self.selections:
            raise ConfigError("--estimators and --selections must not be empty")
        for e in self.estimators:
            if e not in ALL_ESTIMATORS:
                raise ConfigError(f"--estimators: unknown {e!r} (choose from {', '.join(ALL_ESTIMATORS)})")
        if self.k is not None and self.k > b and any(estimator_kind(e).needs_k for e in self.estimators):
            raise ConfigError(f"--k {self.k} exceeds --budget {b} pairs per row")
        for s in self.selections:
            if s not in STRATEGIES:
                raise ConfigError(f"--selections: unknown {s!r} (choose from {', '.join(STRATEGIES)})")
        from .train import PROXY_KINDS

        if self.proxy not in PROXY_KINDS:
            raise ConfigError(f"--proxy must be one of {', '.join(PROXY_KINDS)} (got {self.proxy!r})")


def combos_for(cfg: ReconstructConfig) -> list[Combo]:
    """The estimator x selection grid plus the optional variants."""
    out = [Combo(e, s) for e in cfg.estimators for s in cfg.selections]
    if cfg.position and "gaussian" in cfg.estimators:
        out += [Combo("gaussian", s, position=True) for s in cfg.selections]
    if cfg.pooled_baseline and "basis" in cfg.estimators and "random" in cfg.selections:
        out.append(Combo("basis", "random", pool_heads=True))
    return out


def check_ranks(cfg: ReconstructConfig, d_head: int) -> None:
    """Every proxy rank flag within [1, d_head] before any work (the fit takes minutes at full size)."""
    if not d_head:
        return
    for flag, ranks in (("--proxy-rank", [cfg.proxy_rank]), ("--extra-ranks", cfg.extra_ranks),
                        ("--frontier-ranks", cfg.frontier_ranks if cfg.frontier or cfg.compute is not None else [])):
        bad = [r for r in ranks or [] if not 1 <= int(r) <= d_head]
        if bad:
            raise ConfigError(f"{flag} {','.join(map(str, bad))}: a proxy rank must be in [1, d_head={d_head}] "
                              f"for --model {cfg.model}")


def residual_proxies(cfg: ReconstructConfig) -> list[tuple[str, int, int]]:
    """The proxies (kind, rank, seed) whose residual statistics the estimators tagged 'residual' need (none if no
    such estimator is evaluated)."""
    residual = any(estimator_kind(e).needs_residual for e in cfg.estimators)
    ranks = [cfg.proxy_rank, *cfg.extra_ranks] if residual else []
    if cfg.frontier or cfg.compute is not None:
        ranks += list(cfg.frontier_ranks)
    return [(cfg.proxy, r, cfg.seed) for r in dict.fromkeys(ranks)]
