"""Sparsity predictors: learned (distance, quantization, clustering) and baselines."""

from .base import BasePredictor, BucketPredictor, Predictor
from .baselines import BigBirdPredictor, LSHPredictor, OracleTopK, RoutingPredictor, WindowPredictor
from .clustering import ClusteringPredictor, kmeans
from .distance import DistancePredictor, Projector
from .quantization import QuantizationPredictor

__all__ = [
    "BasePredictor", "BigBirdPredictor", "BucketPredictor", "ClusteringPredictor", "DistancePredictor",
    "LSHPredictor", "OracleTopK", "Predictor", "Projector", "QuantizationPredictor", "RoutingPredictor",
    "WindowPredictor", "kmeans", "make_predictor", "METHODS",
]

METHODS = ("distance-thr", "distance-knn", "quantization", "clustering", "window", "bigbird", "lsh", "routing",
           "oracle-topk")


def make_predictor(method: str, rank: int = 4, epochs: int = 20, seed: int = 0, projector: "Projector | None" = None,
                   loss: str = "sum", force_window: int = -1, force_cls: bool = False, **kw) -> BasePredictor:
    """Build a predictor by method name (see ``METHODS``); learned ones may share a fitted ``projector``.

    ``force_window`` >= 0 / ``force_cls`` add forced edges (counted in sparsity and recall, as in Sparsefinder)."""
    p = _make(method, rank, epochs, seed, projector, loss, **kw)
    p.force_window, p.force_cls = int(force_window), bool(force_cls)
    return p


def _make(method: str, rank: int, epochs: int, seed: int, projector, loss: str, **kw) -> BasePredictor:
    from ...errors import ConfigError

    if projector is None and method in ("distance-thr", "distance-knn", "quantization", "clustering", "clustering-top2"):
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
    raise ConfigError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}, clustering-top2")
