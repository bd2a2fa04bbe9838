"""Pareto rows of a finished Sparsefinder section and the learned-vs-baseline comparison per layer."""

from __future__ import annotations

from typing import Optional

from .metrics import pareto_front

TARGET = 0.9


def pareto_table(info: dict) -> list[dict]:
    """Flat rows (method, knob, sparsity, recall, exact, cost, comp_sparsity, front, front_cost) of a finished section.

    ``front``: the point is on the Pareto front of (sparsity, recall) over *all* methods' points (oracle excluded);
    ``front_cost``: on the front of (cost lower, recall higher) over all methods."""
    rows = []
    for m, res in info["methods"].items():
        for p in res["points"]:
            rows.append({"method": m, "knob": f"{res['knob']}={p['knob']}",
                         **{k: p["mean"].get(k, float("nan")) for k in ("sparsity", "recall", "exact", "cost",
                                                                       "comp_sparsity")}})
    cand = [i for i, r in enumerate(rows) if r["method"] != "oracle-topk"]
    front = set(cand[j] for j in pareto_front([(rows[i]["sparsity"], rows[i]["recall"]) for i in cand]))
    front_c = set(cand[j] for j in pareto_front([(-rows[i]["cost"], rows[i]["recall"]) for i in cand]))
    for i, r in enumerate(rows):
        r["front"], r["front_cost"] = i in front, i in front_c
    return rows


def _curve(points: list[tuple[float, float]]):
    """Recall as a function of sparsity along the Pareto front (linear interpolation; None beyond the sparsest)."""
    front = [points[i] for i in pareto_front(points)]

    def f(s: float) -> Optional[float]:
        if not front or s > front[-1][0] + 1e-12:
            return None
        if s <= front[0][0]:
            return front[0][1]
        for (s0, r0), (s1, r1) in zip(front, front[1:]):
            if s0 <= s <= s1:
                return r0 if s1 == s0 else r0 + (s - s0) / (s1 - s0) * (r1 - r0)
        return None

    return f


def compare_methods(results: dict, target: float = TARGET) -> dict:
    """Per layer: does the best learned predictor's front lie above every baseline's front points, and how far
    is it from the oracle at ``target`` sparsity?

    For each layer and baseline point (s, r) with s <= the learned method's sparsest point, the margin is
    learned recall at s (interpolated on its per-layer front) minus r; ``beats_all`` = every margin >= 0."""
    from .predictors import trained_methods

    learned = [m for m in results if m in trained_methods()]
    baselines = [m for m in results if m not in learned and m != "oracle-topk"]
    if not learned:
        return {}
    best = max(learned, key=lambda m: results[m].get(f"recall_at_{target:g}") or -1.0)
    L = len(results[best]["points"][0]["per_layer"]["recall"])
    layers = []
    for l in range(L):
        pts = lambda m: [(p["per_layer"]["sparsity"][l], p["per_layer"]["recall"][l]) for p in results[m]["points"]]  # noqa: E731
        f = _curve(pts(best))
        worst, where, n_cmp = float("inf"), None, 0
        for b in baselines:
            for s, r in (pts(b)[i] for i in pareto_front(pts(b))):
                v = f(s)
                if v is None or s <= 0.0:
                    continue
                n_cmp += 1
                if v - r < worst:
                    worst, where = v - r, {"baseline": b, "sparsity": s, "baseline_recall": r, "learned_recall": v}
        rec = {"layer": l, "min_margin": None if n_cmp == 0 else worst, "worst": where, "n_compared": n_cmp,
               "beats_all": n_cmp > 0 and worst >= 0.0,
               "learned_recall_at_target": results[best][f"recall_at_{target:g}_per_layer"][l]}
        if "oracle-topk" in results:
            o = results["oracle-topk"][f"recall_at_{target:g}_per_layer"][l]
            rec["oracle_recall_at_target"] = o
            lr = rec["learned_recall_at_target"]
            rec["gap_to_oracle"] = None if o is None or lr is None else o - lr
        layers.append(rec)
    return {"best_learned": best, "baselines": baselines, "per_layer": layers,
            "beats_all_layers": all(x["beats_all"] for x in layers)}
