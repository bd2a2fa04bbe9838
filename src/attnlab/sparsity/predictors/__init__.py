"""Sparsity predictors: learned (distance, quantization, clustering) and baselines."""

from .base import BasePredictor, BucketPredictor, Predictor
from .baselines import BigBirdPredictor, LSHPredictor, OracleTopK, RoutingPredictor, WindowPredictor
from .clustering import ClusteringPredictor, kmeans
from .distance import DistancePredictor, Projector
from .patterns import LongformerPredictor, StridedPredictor
from .quantization import QuantizationPredictor
from .rank import RankPredictor

__all__ = [
    "BasePredictor", "BigBirdPredictor", "BucketPredictor", "ClusteringPredictor", "DistancePredictor",
    "LSHPredictor", "OracleTopK", "Predictor", "Projector", "QuantizationPredictor", "RoutingPredictor",
    "WindowPredictor", "kmeans", "make_predictor", "METHODS", "LongformerPredictor", "StridedPredictor", "RankPredictor",
    "LEARNED", "EXTRA_METHODS",
]

METHODS = ("distance-thr", "distance-knn", "quantization", "clustering", "window", "bigbird", "lsh", "routing",
           "oracle-topk", "longformer", "strided", "rank")
# methods that share the Sparsefinder projector (trained once per layer)
LEARNED = ("distance-thr", "distance-knn", "quantization", "quantization-fixed", "quantization-dynamic", "clustering",
           "clustering-top2")
# accepted by --methods but not run by default
EXTRA_METHODS = ("clustering-top2", "quantization-fixed", "quantization-dynamic", "strided-fixed", "rank-knn")


def make_predictor(method: str, rank: int = 4, epochs: int = 20, seed: int = 0, projector: "Projector | None" = None,
                   loss: str = "sum", force_window: int = -1, force_cls: bool = False, **kw) -> BasePredictor:
    """Build a predictor by method name (see ``METHODS``); learned ones may share a fitted ``projector``.

    ``force_window`` >= 0 / ``force_cls`` add forced edges (counted in sparsity and recall, as in Sparsefinder)."""
    p = _make(method, rank, epochs, seed, projector, loss, **kw)
    p.force_window, p.force_cls = int(force_window), bool(force_cls)
    return p


def _make(method: str, rank: int, epochs: int, seed: int, projector, loss: str, **kw) -> BasePredictor:
    from ...errors import ConfigError

    kw = dict(kw)
    score_rank = kw.pop("score_rank", None)
    if method in ("longformer",):
        return LongformerPredictor(**kw)
    if method in ("strided", "strided-fixed"):
        return StridedPredictor(mode="fixed" if method.endswith("fixed") else "strided", **kw)
    if method in ("rank", "rank-knn"):
        return RankPredictor(rank=score_rank or rank, epochs=epochs, seed=seed,
                             mode="knn" if method.endswith("knn") else "gap", **kw)
    if method.startswith("quantization-"):
        kw = {**kw, "mode": method.split("-", 1)[1]}
        method = "quantization"
    if projector is None and method in LEARNED:
        projector = Projector(rank, epochs=epochs, seed=seed, loss=loss)
    learned = dict(rank=rank, epochs=epochs, seed=seed, projector=projector)
    if method == "distance-thr":
        return DistancePredictor(mode="threshold", **learned, **kw)
    if method == "distance-knn":
        return DistancePredictor(mode="knn", **learned, **kw)
    if method == "quantization":
        return QuantizationPredictor(**learned, **kw)
    if method in ("clustering", "clustering-top2"):
        return ClusteringPredictor(top=2 if method.endswith("top2") else 1, **learned, **kw)
    if method == "window":
        return WindowPredictor(**kw)
    if method == "bigbird":
        return BigBirdPredictor(seed=seed, **kw)
    if method == "lsh":
        return LSHPredictor(seed=seed, **kw)
    if method == "routing":
        return RoutingPredictor(seed=seed, **kw)
    if method == "oracle-topk":
        return OracleTopK(**kw)
    raise ConfigError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
