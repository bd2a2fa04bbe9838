"""Tests for attnlab.sparsity (Sparsefinder): gold graphs, metrics, predictors, training, end-to-end."""

from __future__ import annotations

import math

import pytest
import torch
from entmax import entmax15, entmax_bisect, sparsemax

from attnlab.errors import AttnlabError, ConfigError, ShapeError
from attnlab.sparsity.graphs import GraphError, attention_scores, gold_graph, graph_from_ids
from attnlab.sparsity.metrics import graph_metrics, pareto_front, recall_at_sparsity
from attnlab.sparsity.predictors import METHODS, BucketPredictor, Predictor, Projector, make_predictor


def qkv(B=2, H=3, N=12, dh=8, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, dh, generator=g) * scale, torch.randn(B, H, N, dh, generator=g) * scale)


def padded_causal(B, N, lengths):
    keys = torch.zeros(B, 1, 1, N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        keys[b, ..., :n] = True
    return keys & torch.ones(N, N, dtype=torch.bool).tril().view(1, 1, N, N)


def reference_support(scores, valid, fn):
    """Row by row: the entmax package applied to the valid keys only."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    B, H, N, _ = scores.shape
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = valid[b, 0, i].nonzero().flatten()
                if len(keys):
                    p = fn(scores[b, h, i, keys][None])[0]
                    out[b, h, i, keys[p > 0]] = True
    return out


# ------------------------------------------------------------------------------------------- gold graphs
@pytest.mark.parametrize("alpha,fn", [
    (1.5, lambda x: entmax15(x, dim=-1)),
    (1.25, lambda x: entmax_bisect(x, 1.25, dim=-1)),
    (1.75, lambda x: entmax_bisect(x, 1.75, dim=-1)),
    (2.0, lambda x: sparsemax(x, dim=-1)),
])
def test_gold_graph_matches_entmax_package_with_masks(alpha, fn):
    q, k = qkv()
    valid = padded_causal(2, 12, [12, 7])
    gold = gold_graph(q, k, valid, alpha)
    ref = reference_support(attention_scores(q, k), valid.expand(2, 1, 12, 12), fn)
    assert torch.equal(gold, ref)
    assert not bool((gold & ~valid).any())
    assert 0 < gold.float().mean() < valid.float().mean()  # genuinely sparse


def test_gold_graph_unmasked_equals_entmax15_support():
    q, k = qkv(seed=3)
    p = entmax15(attention_scores(q, k), dim=-1)
    assert torch.equal(gold_graph(q, k), p > 0)


def test_gold_graph_bad_alpha_and_empty():
    q, k = qkv()
    for a in (1.0, 0.5):
        with pytest.raises(ConfigError, match="alpha"):
            gold_graph(q, k, alpha=a)
    with pytest.raises(GraphError, match="empty"):
        gold_graph(q, k, torch.zeros(1, 1, 12, 12, dtype=torch.bool))
    with pytest.raises(ShapeError):
        gold_graph(q, k[..., :4])


# ------------------------------------------------------------------------------------------- metrics
def test_metrics_on_hand_made_graphs():
    # one sequence, one head, n = 4, all pairs valid (16)
    gold = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    gold[0, 0, 0, [0, 1]] = True
    gold[0, 0, 1, 1] = True
    gold[0, 0, 2, [0, 2, 3]] = True
    gold[0, 0, 3, 3] = True  # 7 gold edges
    pred = torch.zeros_like(gold)
    pred[0, 0, 0, [0, 1, 2]] = True  # row 0: both gold found
    pred[0, 0, 2, [0, 2]] = True  # row 2: 2 of 3
    pred[0, 0, 3, 3] = True  # row 3: found; row 1 missed
    m = graph_metrics(pred, gold, predictor_ops=4.0)
    assert m.sparsity.item() == pytest.approx(1 - 6 / 16)
    assert m.recall.item() == pytest.approx(5 / 7)
    assert m.exact.item() == pytest.approx(2 / 4)
    assert m.cost.item() == pytest.approx((6 + 4) / 16)


def test_metrics_respect_valid_mask_and_average_over_batch():
    gold = torch.eye(3, dtype=torch.bool).expand(2, 1, 3, 3).clone()
    valid = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()  # 6 valid pairs each
    pred = torch.ones(2, 1, 3, 3, dtype=torch.bool)  # masked pairs must not count
    pred[1, 0, 2, 2] = False
    m = graph_metrics(pred, gold, valid)
    assert m.sparsity.item() == pytest.approx(((1 - 6 / 6) + (1 - 5 / 6)) / 2)
    assert m.recall.item() == pytest.approx((1 + 2 / 3) / 2)
    assert m.exact.item() == pytest.approx((1 + 2 / 3) / 2)
    assert m.cost.item() == pytest.approx((6 / 6 + 5 / 6) / 2)  # causal: normalised by n(n+1)/2 = 6 valid pairs


def test_metric_errors():
    gold = torch.eye(4, dtype=torch.bool).view(1, 1, 4, 4)
    with pytest.raises(ShapeError, match="shape"):
        graph_metrics(torch.ones(1, 1, 4, 5, dtype=torch.bool), gold)
    with pytest.raises(ShapeError):
        graph_metrics(torch.ones(1, 4, 4, dtype=torch.bool), gold)
    with pytest.raises(GraphError, match="empty"):
        graph_metrics(gold, torch.zeros_like(gold))
    assert issubclass(GraphError, AttnlabError)


def test_pareto_front_and_recall_at_sparsity():
    pts = [(0.0, 1.0), (0.5, 0.9), (0.4, 0.8), (0.8, 0.7), (1.0, 0.0), (0.8, 0.6)]
    assert pareto_front(pts) == [0, 1, 3, 4]
    assert recall_at_sparsity(pts, 0.9) == pytest.approx(0.35)
    assert recall_at_sparsity(pts, 0.5) == pytest.approx(0.9)
    assert recall_at_sparsity([(0.2, 1.0), (0.5, 0.9)], 0.9) is None
    assert recall_at_sparsity([(0.95, 0.5), (0.99, 0.2)], 0.9) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- predictors
def fitted(method, q, k, gold, seed=0):
    kw = dict(rank=3, epochs=3, seed=seed) if method in ("distance-thr", "distance-knn", "quantization", "clustering",
                                                           "clustering-top2") else dict(seed=seed)
    return make_predictor(method, **kw).fit(q, k, gold, None)


@pytest.mark.parametrize("method", [*METHODS, "clustering-top2"])
def test_each_predictor_recall_one_at_full_budget(method):
    q, k = qkv(B=3, N=16)
    valid = padded_causal(3, 16, [16, 16, 10])
    gold = gold_graph(q, k, valid)
    p = fitted(method, q, k, gold)
    assert isinstance(p, Predictor)
    full = p.with_knob(p.all_pairs(16))
    g = full.predict(q, k, valid)
    assert g.shape == gold.shape and g.dtype == torch.bool
    m = graph_metrics(g, gold, valid, full.cost(16))
    assert torch.allclose(m.recall, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(m.sparsity, torch.zeros(3, dtype=torch.float64))
    # the sweep grid is densest first, and the sparsest point predicts fewer pairs
    sparse = p.with_knob(p.grid(16)[-1])
    assert graph_metrics(sparse.predict(q, k, valid), gold, valid).sparsity.mean() > 0.3


@pytest.mark.parametrize("method", ["quantization", "clustering", "clustering-top2", "lsh", "routing"])
def test_assign_ids_give_the_predicted_graph(method):
    q, k = qkv(B=2, N=16)
    gold = gold_graph(q, k)
    p = fitted(method, q, k, gold).with_knob(4)
    assert isinstance(p, BucketPredictor)
    qi, ki = p.assign(q, k)
    assert qi.shape[:3] == (2, 3, 16) and ki.shape[:3] == (2, 3, 16) and qi.dtype == torch.long
    assert torch.equal(graph_from_ids(qi, ki), p.predict(q, k))


@pytest.mark.parametrize("method", ["distance-thr", "distance-knn", "clustering", "bigbird", "lsh", "routing"])
def test_predictors_deterministic_with_seed(method):
    q, k = qkv(B=2, N=16)
    gold = gold_graph(q, k)
    a = fitted(method, q, k, gold, seed=5)
    b = fitted(method, q, k, gold, seed=5)
    knob = a.grid(16)[len(a.grid(16)) // 2]
    assert torch.equal(a.with_knob(knob).predict(q, k), b.with_knob(knob).predict(q, k))


@pytest.mark.parametrize("loss", ["sum", "pair"])
def test_projector_learns_gold_structure(loss):
    q, k = qkv(B=8, H=2, N=16, dh=8, seed=1)
    gold = gold_graph(q, k)
    p = Projector(rank=4, epochs=30, lr=3e-2, seed=0, loss=loss).fit(q, k, gold)
    assert p.history[-1] < p.history[0]
    dist = make_predictor("distance-knn", projector=p).fit(q, k, gold)
    rand = make_predictor("distance-knn", projector=Projector(4, epochs=0, seed=0)).fit(q, k, gold)
    k4 = lambda pr: graph_metrics(pr.with_knob(4).predict(q, k), gold).recall.mean()  # noqa: E731
    assert k4(dist) > k4(rand)


def test_predictor_bad_options():
    with pytest.raises(ConfigError, match="--methods"):
        make_predictor("nope")
    with pytest.raises(ConfigError, match="--window"):
        make_predictor("window", window=-1)
    with pytest.raises(ConfigError, match="--n-buckets"):
        make_predictor("lsh", n_buckets=3)
    with pytest.raises(ConfigError, match="fitted"):
        make_predictor("clustering").predict(*qkv())
    with pytest.raises(ConfigError, match="--rank"):
        Projector(rank=0)
    with pytest.raises(ConfigError, match="--loss"):
        Projector(loss="triplet")


def test_oracle_topk_is_an_upper_bound_for_knn():
    q, k = qkv(B=4, N=16, seed=2)
    gold = gold_graph(q, k)
    o = make_predictor("oracle-topk", k=4).fit(q, k, gold)
    d = fitted("distance-knn", q, k, gold).with_knob(4)
    assert graph_metrics(o.predict(q, k), gold).recall.mean() >= graph_metrics(d.predict(q, k), gold).recall.mean()


# ------------------------------------------------------------------------------------------- training / e2e
def test_train_config_validation():
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig

    with pytest.raises(ConfigError, match="alpha"):
        EntmaxTrainConfig(alpha=1.0)
    with pytest.raises(ConfigError, match="--objective"):
        EntmaxTrainConfig(objective="seq2seq")


@pytest.fixture(scope="module")
def tokenizer():
    from attnlab.sparsity.train_entmax import tokenizer_of

    return tokenizer_of()


def test_end_to_end_tiny(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from attnlab.io import RunDir
    from attnlab.sparsity import render_section, sparsity
    from attnlab.sparsity.cli import app
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig, load_small

    cfg = EntmaxTrainConfig(objective="clm", seq_len=24, vocab_size=256, d_model=32, n_heads=2, n_layers=2, steps=8,
                            batch_size=8, max_windows=64, seed=0)
    methods = ["distance-knn", "quantization", "window", "lsh", "oracle-topk"]
    info = sparsity(tmp_path, train=cfg, methods=methods, n_fit=12, n_eval=6, n_down=6, epochs=2, quiet=True)
    assert info["complete"] and set(info["recall_at_0.9"]) == set(methods)
    for m in methods:
        first = info["methods"][m]["points"][0]["mean"]
        assert first["recall"] == pytest.approx(1.0) and first["sparsity"] == pytest.approx(0.0)
    down = info["downstream"]
    assert down["gold_graph"]["loss"] == pytest.approx(down["full_entmax"]["loss"], abs=1e-4)
    assert all(len(rows) >= 1 for rows in down["methods"].values())
    run = RunDir(tmp_path, create=False)
    assert run.section("sparsity")["complete"]
    for name in info["plots"].values():
        assert (tmp_path / name).is_file()
    html = render_section(run)
    assert "<img src=" in html and "recall@0.9" in html
    model, vmap, tcfg, _ = load_small(tmp_path / "entmax_model.safetensors")
    assert model.cfg.causal and model.cfg.attention == "entmax" and tcfg.steps == 8
    # resume: same config returns the stored section without work
    again = sparsity(tmp_path, train=cfg, methods=methods, n_fit=12, n_eval=6, n_down=6, epochs=2, quiet=True)
    assert again["wall_s"] == info["wall_s"]
    res = CliRunner().invoke(app, ["table", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "Recall at sparsity 0.9" in res.output
    res = CliRunner().invoke(app, ["table", "--out", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "error" in res.output


def test_same_seed_same_training(tokenizer):
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig, load_corpus_windows, train_small

    cfg = EntmaxTrainConfig(seq_len=16, vocab_size=128, d_model=16, n_heads=2, n_layers=1, steps=3, batch_size=4,
                            max_windows=32, seed=7)
    w = load_corpus_windows(cfg, tokenizer, "fit", 32)
    a = train_small(cfg, w, tokenizer, quiet=True)[0]
    b = train_small(cfg, w, tokenizer, quiet=True)[0]
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_cli_help():
    from typer.testing import CliRunner

    from attnlab.sparsity.cli import app

    for args in (["--help"], ["run", "--help"], ["train", "--help"], ["table", "--help"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0 and "Usage" in res.output


@pytest.mark.slow
def test_hf_entmax_swap_and_finetune():
    from attnlab.capture.corpus import token_windows
    from attnlab.capture.hf import load_model
    from attnlab.sparsity.evaluate import capture_layers
    from attnlab.sparsity.train_entmax import entmax_handler, finetune_hf_entmax, hf_hidden

    hf = load_model("minilm")
    ids = token_windows(hf.tokenizer, 32, max_windows=8, split="fit")
    soft = hf_hidden(hf, ids)
    ent = hf_hidden(hf, ids, handler=entmax_handler(1.5))
    assert not torch.allclose(soft, ent)
    hist = finetune_hf_entmax(hf, ids, steps=3, batch_size=4, lr=1e-4, quiet=True)
    assert len(hist["mse"]) == 3 and all(math.isfinite(x) for x in hist["mse"])
    layers = capture_layers(hf, ids[:4], layers=[0, 5])
    assert len(layers) == 2 and 0 < layers[0].density() < 1
