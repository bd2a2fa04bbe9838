"""Offline per-head knobs (fit, save, load, run-time check, recalibration) and the fast vertical-slash path,
checked against float64 exact attention and the reference predictor; the 8B-geometry preset's CPU twin."""

from __future__ import annotations

import pytest
import torch

from attnlab.blocksparse.blockmask import BlockPattern, kv_to_block_graph
from attnlab.blocksparse.calibration import KNOBS_FILE, KnobStore, OfflinePredictor, knob_key, n_bucket, \
    offline_predictor
from attnlab.blocksparse.kernels.vertical_slash import VSParams, plan_for, vertical_slash_fast
from attnlab.blocksparse.predictors import make_block_predictor
from attnlab.blocksparse.predictors.core import keep_graph, pattern_row_recall, row_block_mass, sample_rows
from attnlab.errors import ConfigError, ShapeError

SMALL = dict(last_q=16, vertical_size=40, slash_size=60, sink_tokens=4, local_offsets=8)


@pytest.fixture(scope="module")
def tiny_8b_lm(tmp_path_factory):
    """Untrained CPU twin of the 8B-geometry preset (8 q / 2 kv heads of 16), sharpened attention."""
    from conftest import save_sharp_lm

    return save_sharp_lm("tiny-8b-attn", 5, tmp_path_factory.mktemp("lm8b"))


def _load(path):
    from attnlab.blocksparse.prefill import load_causal_model

    return load_causal_model(path, torch.device("cpu"), torch.float64)


def test_8b_geometry_presets():
    from attnlab.lm.train import PRESETS, LMConfig, build_model

    big, twin = PRESETS["gpu-8b-attn"], PRESETS["tiny-8b-attn"]
    assert (big.n_heads, big.n_kv_heads, big.head_dim) == (32, 8, 128)
    assert twin.n_heads // twin.n_kv_heads == big.n_heads // big.n_kv_heads
    m = build_model(twin)
    assert m.config.head_dim == 16 and m.model.layers[0].self_attn.q_proj.out_features == 8 * 16
    assert LMConfig().key() == LMConfig(head_dim=None).key() != LMConfig(head_dim=64).key()
    with pytest.raises(ConfigError, match="--head-dim"):
        LMConfig(head_dim=7)
    with pytest.raises(ConfigError, match="--d-model"):
        LMConfig(d_model=100, n_heads=8)
    LMConfig(d_model=100, n_heads=8, n_kv_heads=2, head_dim=16)  # explicit head_dim: width is free


@pytest.mark.parametrize("repeated", [True, False])
def test_vertical_slash_fast_equals_reference_float64(repeated):
    g = torch.Generator().manual_seed(0)
    B, Hk, G, N, D, bs = 2, 2, 4, 512, 16, 32
    H = Hk * G
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * 2
    kv = torch.randn(B, Hk, N, D, generator=g, dtype=torch.float64) * 2
    k = kv.repeat_interleave(G, 1)
    m = make_block_predictor("minference", calibrate=False, **SMALL)
    state, _ = m.prepare(q, k, True, bs, D ** -0.5)
    th = m.thresholds(state, True, bs)
    rows = sample_rows(N, 24, 7, 1)
    exact = row_block_mass(q, k, rows, bs, True, D ** -0.5)
    for knob in (torch.rand(H, generator=g, dtype=torch.float64) * 3, torch.full((H,), 0.05, dtype=torch.float64)):
        ref = m.build(state, keep_graph(th, knob), True, bs)
        res = vertical_slash_fast(q, k if repeated else kv, knob, D ** -0.5, rows, VSParams(**SMALL, block_size=bs),
                                  group=G)
        assert torch.equal(kv_to_block_graph(ref.kv), kv_to_block_graph(res.kv))
        assert torch.equal(res.kv.full_kv_num_blocks, ref.kv.full_kv_num_blocks)
        rec = pattern_row_recall(ref, rows, row_mass=exact)
        torch.testing.assert_close(res.recall.double(), rec.mean(dim=(0, 2)), atol=1e-6, rtol=0)
        from attnlab.blocksparse.prefill import head_density

        torch.testing.assert_close(res.density.double(), head_density(ref).double())
    plan = plan_for(q, k, D ** -0.5, rows, VSParams(**SMALL, block_size=bs), G)
    assert not plan.graphed and plan.why_eager == "not CUDA"
    again = plan.run(q, k, knob)
    assert torch.equal(kv_to_block_graph(again.kv), kv_to_block_graph(res.kv))


def test_vertical_slash_fast_bad_shapes():
    q = torch.randn(1, 8, 96, 8)
    with pytest.raises(ShapeError, match="multiple of block_size"):
        vertical_slash_fast(q, q, torch.ones(8), 1.0, torch.tensor([1]), VSParams(block_size=64))
    with pytest.raises(ShapeError, match="key heads"):
        vertical_slash_fast(q, q[:, :3], torch.ones(8), 1.0, torch.tensor([1]), VSParams(block_size=32), group=4)


def test_knob_store_roundtrip_and_refusals(tmp_path):
    assert n_bucket(16384) == 16384 and n_bucket(16385) == 32768
    assert knob_key("minference", 0.95, 20000, 128) == "minference[]|p=0.95|bs=128|N=32768"
    st = KnobStore.load(tmp_path)
    assert st.entries == {} and st.path == tmp_path / KNOBS_FILE
    st.put("a", torch.tensor([[0.5, 1.0]]), fit_windows=2)
    st.save()
    back = KnobStore.load(tmp_path / KNOBS_FILE)
    assert back.get("a").tolist() == [[0.5, 1.0]] and back.entries["a"]["fit_windows"] == 2 and back.get("b") is None
    with pytest.raises(ShapeError):
        st.put("b", torch.ones(3))
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not an attnlab knob file"):
        KnobStore.load(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="--knobs"):
        KnobStore.load(tmp_path / "bad.json")


def _qk(hf, ids):
    """Real (q, k, scale) of layer 0 for one window (captured through the prefill hooks)."""
    from attnlab.blocksparse.prefill import dense_sdpa, prefill_hooks

    got = {}

    def grab(call):
        got.setdefault(call.layer, (call.query, call.key, call.scaling))
        return dense_sdpa(call.query, call.key, call.value, call.scaling)

    with prefill_hooks(hf, grab), torch.no_grad():
        hf.model(input_ids=ids, use_cache=False)
    return got


def test_offline_fit_save_load_and_check_against_float64(tiny_8b_lm, tmp_path):
    from attnlab.blocksparse.prefill import heldout_windows

    hf = _load(tiny_8b_lm)
    store = tmp_path / "knobs.json"
    pred, rec = offline_predictor(hf, "minference", 0.9, 128, 16, store, fit_count=2, options=SMALL, check_rows=16)
    assert rec["fitted_now"] and store.exists() and rec["fit_windows"] == 2 and pred.group == 4
    assert pred.knobs.shape == (hf.n_layers, hf.n_heads) and (pred.knobs > 0).all()
    pred2, rec2 = offline_predictor(hf, "minference", 0.9, 128, 16, store, options=SMALL, check_rows=16)
    assert not rec2["fitted_now"] and torch.equal(pred2.knobs, pred.knobs)
    # run time on a held-out window (not fitted on): the check recall equals float64 exact recall of the pattern
    ids = heldout_windows(hf, 128, 1)
    q, k, scale = _qk(hf, ids)[1]
    pattern, _ = pred2(q, k, 0.9, 16, scale, layer=1)
    rows = sample_rows(128, 16, pred2.seed, 1)
    exact = pattern_row_recall(pattern, rows, row_mass=row_block_mass(q.double(), k.double(), rows, 16, True, scale))
    assert pred2.last_info["path"].startswith("eager")
    if not pred2.last_info["recalibrated_heads"]:
        torch.testing.assert_close(torch.tensor(pred2.last_info["check_recall"]), exact.mean(dim=(0, 2)).float(),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="fitted for p=0.9"):
        pred2(q, k, 0.95, 16, scale, layer=1)
    with pytest.raises(ShapeError, match="layer"):
        pred2(q, k, 0.9, 16, scale, layer=7)


@pytest.mark.parametrize("name", ["minference", "pooled"])
def test_low_recall_triggers_recalibration_and_good_knobs_do_not(tiny_8b_lm, name):
    from attnlab.blocksparse.prefill import heldout_windows

    hf = _load(tiny_8b_lm)
    q, k, scale = _qk(hf, heldout_windows(hf, 128, 1))[0]
    opts = SMALL if name == "minference" else {}
    p = 0.9
    low = OfflinePredictor(name, p, torch.zeros(hf.n_layers, hf.n_heads), 16, opts, group=4, check_rows=16)
    rows = sample_rows(128, 16, low.seed, 1)
    mass = row_block_mass(q.double(), k.double(), rows, 16, True, scale)
    zero_pat = low.method.build(*_ref_graph(low, q, k, scale, torch.zeros(hf.n_heads)), True, 16)
    before = pattern_row_recall(zero_pat, rows, row_mass=mass).mean(dim=(0, 2))
    pattern, _ = low(q, k, p, 16, scale, layer=0)
    after = pattern_row_recall(pattern, rows, row_mass=mass).mean(dim=(0, 2))
    failing = before < p - 0.2
    assert failing.any(), "zero knobs should miss p on some head"
    assert low.recalibrations and low.last_info["recalibrated_heads"] >= int(failing.sum())
    assert (low.knobs[0] >= 0).all() and (low.knobs[0][failing] > 0).all()
    assert (after[failing] > before[failing]).all()
    high = OfflinePredictor(name, p, torch.full((hf.n_layers, hf.n_heads), 1e6), 16, opts, group=4, check_rows=16)
    pattern, _ = high(q, k, p, 16, scale, layer=0)
    assert not high.recalibrations and min(high.last_info["check_recall"]) > 1 - 1e-6


def _ref_graph(pred, q, k, scale, knob):
    from attnlab.blocksparse.predictors.core import expand_kv_heads

    ke = expand_kv_heads(k, q.shape[1])
    state, _ = pred.method.prepare(q, ke, True, 16, scale)
    return state, keep_graph(pred.method.thresholds(state, True, 16), knob)


def test_run_prefill_offline_reports_paths_and_calibration(tiny_8b_lm, tmp_path):
    from attnlab.blocksparse.prefill import PrefillConfig, run_prefill

    cfg = PrefillConfig(model=tiny_8b_lm, seq_len=128, predictor="pooled", recall=0.9, block_size=16, windows=1,
                        rows=32, reps=1, device="cpu", calibration="offline", knobs=str(tmp_path / "k.json"),
                        fit_windows=1, check_rows=16)
    res = run_prefill(cfg)
    cal = res["calibration"]
    assert cal["mode"] == "offline" and cal["fitted_now"] and (tmp_path / "k.json").exists()
    assert len(res["layers"]) == 2 and {r["path"] for r in res["layers"]} <= {"sparse", "dense", "mixed"}
    assert all("why" in r for r in res["layers"])
    recs = res["windows"][0]["layers"]
    assert all(r["predictor_info"].get("path") == "reference" for r in recs)
    assert res["summary"]["recall_min_head"] > 0.5
    with pytest.raises(ConfigError, match="--calibration"):
        PrefillConfig(model=tiny_8b_lm, calibration="sometimes")


@pytest.mark.gpu
def test_fast_graph_path_matches_reference_on_cuda():
    """bf16 on CUDA: the graphed fast path gives the reference pattern (float32 scores) up to near-ties, the
    same recall, and replays give what the eager fast path gives."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(3)
    B, Hk, G, N, D, bs = 1, 8, 4, 8192, 128, 128
    H = Hk * G
    q = (torch.randn(B, H, N, D, generator=g) * 1.5).cuda().bfloat16()
    kv = (torch.randn(B, Hk, N, D, generator=g) * 1.5).cuda().bfloat16()
    k = kv.repeat_interleave(G, 1)
    params = VSParams(block_size=bs)
    m = make_block_predictor("minference", calibrate=False)
    knob = torch.rand(H, generator=g, dtype=torch.float64).cuda() * 1.5
    state, _ = m.prepare(q, k, True, bs, D ** -0.5)
    ref = m.build(state, keep_graph(m.thresholds(state, True, bs), knob), True, bs)
    rows = sample_rows(N, 64, 7, 1)
    plan = plan_for(q, k, D ** -0.5, rows, params, G)
    assert plan.graphed, plan.why_eager
    res = plan.run(q, k, knob)
    eager = vertical_slash_fast(q, k, knob, D ** -0.5, rows, params, G)
    gr, gf, ge = (kv_to_block_graph(x.kv) for x in (ref, res, eager))
    assert torch.equal(gf, ge)
    assert (gr == gf).float().mean() > 0.995
    rec = pattern_row_recall(ref, rows.cuda(), row_mass=row_block_mass(q, k, rows.cuda(), bs, True, D ** -0.5))
    assert (res.recall - rec.mean(dim=(0, 2))).abs().max() < 5e-3
    res2 = plan.run(q, k, knob * 0.5)  # a new knob through the same graph: fewer tiles
    assert kv_to_block_graph(res2.kv).sum() <= gf.sum()
    bm = BlockPattern(res.kv, bs, True).block_mask()  # the graphed lists build a FlexAttention mask of this length
    assert tuple(bm.seq_lengths) == (N, N) and bm.kv_num_blocks.shape[1] == H


@pytest.mark.gpu
def test_offline_prefill_on_cuda(tiny_8b_lm, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from attnlab.blocksparse.prefill import PrefillConfig, run_prefill

    res = run_prefill(PrefillConfig(model=tiny_8b_lm, seq_len=1024, predictor="minference", recall=0.9,
                                    block_size=128, windows=1, reps=1, rows=64, device="cuda",
                                    calibration="offline", knobs=str(tmp_path / "k.json"), fit_windows=1))
    recs = res["windows"][0]["layers"]
    assert all(r["predictor_info"]["path"] == "graph" for r in recs)
    assert res["layers"][0]["prediction_ms"] > 0 and res["summary"]["recall_min_head"] > 0.5


def test_knobs_of_other_weights_are_refitted(tiny_8b_lm, tmp_path):
    """A model retrained into the same folder must not reuse knobs fitted on the old weights."""
    import json
    import shutil

    from attnlab.blocksparse.calibration import model_fingerprint

    folder = tmp_path / "m"
    shutil.copytree(tiny_8b_lm, folder)
    (folder / KNOBS_FILE).unlink(missing_ok=True)
    hf = _load(str(folder))
    fp = model_fingerprint(folder)
    _, rec = offline_predictor(hf, "pooled", 0.9, 128, 16, fit_count=1, check_rows=16)
    assert rec["fitted_now"] and not rec["refit_stale"] and rec["model"] == fp
    _, rec = offline_predictor(hf, "pooled", 0.9, 128, 16, fit_count=1, check_rows=16)
    assert not rec["fitted_now"]
    meta = json.loads((folder / "attnlab_lm.json").read_text())
    meta["train_loss"] = 1.25  # as after a retraining into the same folder
    (folder / "attnlab_lm.json").write_text(json.dumps(meta))
    assert model_fingerprint(folder) != fp
    _, rec = offline_predictor(hf, "pooled", 0.9, 128, 16, fit_count=1, check_rows=16)
    assert rec["fitted_now"] and rec["refit_stale"] and rec["model"] == model_fingerprint(folder)
    assert model_fingerprint(tmp_path / "nowhere") is None
