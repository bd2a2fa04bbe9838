"""Sparsity predictors: learned (distance, quantization, clustering) and baselines, registered by name."""

from functools import partial

from ..protocol import PREDICTORS, build_predictor

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
    "WindowPredictor", "kmeans", "make_predictor", "METHODS", "PREDICTORS", "LongformerPredictor",
    "StridedPredictor", "RankPredictor", "trained_methods",
]

# Registrations, in the order runs list them (``all``: in the full set ``attnlab sparsity run --all``
# evaluates, :data:`METHODS`; the run's own default set is ``sparsity.run.DEFAULT_METHODS``; ``learned``: takes
# rank / epochs / projector, and shares one trained projector per layer in a run).
_LEARNED = ("all", "learned")
PREDICTORS.add("distance-thr", partial(DistancePredictor, mode="threshold"), "learned projection, distance threshold", _LEARNED)
PREDICTORS.add("distance-knn", partial(DistancePredictor, mode="knn"), "learned projection, k nearest keys", _LEARNED)
PREDICTORS.add("quantization", QuantizationPredictor, "learned projection, same-bucket pairs", _LEARNED)
PREDICTORS.add("clustering", ClusteringPredictor, "learned projection, k-means, same-cluster pairs", _LEARNED)
PREDICTORS.add("window", WindowPredictor, "local band |i - j| <= w", ("all",))
PREDICTORS.add("bigbird", BigBirdPredictor, "window + global + random keys", ("all",))
PREDICTORS.add("lsh", LSHPredictor, "Reformer angular LSH buckets", ("all",))
PREDICTORS.add("routing", RoutingPredictor, "Routing Transformer k-means on q/k", ("all",))
PREDICTORS.add("oracle-topk", OracleTopK, "exact top-k keys per query (upper bound)", ("all",))
PREDICTORS.add("clustering-top2", partial(ClusteringPredictor, top=2), "clustering, two nearest centroids",
               ("learned",))
PREDICTORS.add("quantization-fixed", partial(QuantizationPredictor, mode="fixed"),
               "quantization, per-sequence equal-size buckets (the authors' --same-size)", ("learned",))
PREDICTORS.add("quantization-dynamic", partial(QuantizationPredictor, mode="dynamic"),
               "quantization, tanh equal-width buckets (the authors' default)", ("learned",))
PREDICTORS.add("longformer", LongformerPredictor, "window + global first/last tokens", ("all",))
PREDICTORS.add("strided", StridedPredictor, "OpenAI Sparse Transformer, strided pattern", ("all",))
PREDICTORS.add("strided-fixed", partial(StridedPredictor, mode="fixed"), "OpenAI Sparse Transformer, fixed pattern")
# ``trained``: fitted on the gold graph with their own scorer (take rank / epochs, not the shared projector)
PREDICTORS.add("rank", partial(RankPredictor, mode="gap"), "low-rank scorer, ranking loss over all keys, gap to "
               "row max, per-head budgets", ("all", "trained"))
PREDICTORS.add("rank-knn", partial(RankPredictor, mode="knn"), "rank scorer with top-k per query", ("trained",))

#: The methods ``attnlab sparsity run --all`` evaluates (registered with tag ``all``, at import).
METHODS = tuple(PREDICTORS.names("all"))


def make_predictor(method: str, rank: int = 4, epochs: int = 20, seed: int = 0, projector: "Projector | None" = None,
                   loss: str = "sum", force_window: int = -1, force_cls: bool = False, **kw) -> BasePredictor:
    """Build a registered predictor by name (see ``PREDICTORS``); learned ones may share a fitted ``projector``.

    ``force_window`` >= 0 / ``force_cls`` add forced edges (counted in sparsity and recall, as in Sparsefinder)."""
    learned = None
    score_rank = kw.pop("score_rank", None)
    tags = PREDICTORS.entry(method).tags
    if "learned" in tags:
        if projector is None:
            projector = Projector(rank, epochs=epochs, seed=seed, loss=loss)
        learned = dict(rank=rank, epochs=epochs, projector=projector)
    if "trained" in tags:
        kw = {"rank": score_rank or rank, "epochs": epochs, **kw}
    p = build_predictor(method, seed=seed, learned=learned, **kw)
    p.force_window, p.force_cls = int(force_window), bool(force_cls)
    return p


def trained_methods() -> tuple[str, ...]:
    """Predictors fitted on the gold graph (tags ``learned`` or ``trained``): the learned side of comparisons."""
    return tuple(dict.fromkeys(PREDICTORS.names("learned") + PREDICTORS.names("trained")))
