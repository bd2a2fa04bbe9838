"""Sparse prefill on sliding-window models (Mistral, Qwen2 with sliding layers, Gemma2 softcapped, Gemma3 text):
tiny random models in float64, window 16 < seq_len 64, block 16 (CPU exact path)."""

from __future__ import annotations

import pytest
import torch

import model_zoo
from attnlab.blocksparse.blockmask import band_block_graph, expand_block_graph
from attnlab.blocksparse.prefill import PrefillConfig, PrefillHandler, predict_fn, run_prefill
from attnlab.blocksparse.prefill.model import timed_forward, window_loss
from attnlab.blocksparse.prefill.window import MaskProbe, layer_windows
from attnlab.blocksparse.predictors import make_block_predictor
from attnlab.errors import ModelError

W, N, BS = 16, 64, 16
LMS = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
       "gemma3_text": "Gemma3ForCausalLM"}
WINDOWS = {"mistral": [W, W], "qwen2": [None, W], "gemma2": [W, None], "gemma3_text": [W, None]}


def _model(mt: str, **kw):
    if not model_zoo.available(mt):
        pytest.skip(f"{mt}: not in the installed transformers")
    return model_zoo.build(mt, cls=LMS[mt], **{"sliding_window": W, **kw}).double()


def _hf(model, name):
    from attnlab.sources.loading import wrap_model

    return wrap_model(model, None, name)


def _ids(seed=0):
    return torch.randint(1, model_zoo.V, (1, N), generator=torch.Generator().manual_seed(seed))


def _own(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _cfg(**kw):
    base = dict(model="tiny", seq_len=N, predictor="full", recall=0.9, block_size=BS, windows=1, rows=64, reps=1,
                device="cpu")
    return PrefillConfig(**{**base, **kw})


@pytest.mark.parametrize("mt", list(LMS))
def test_windowed_full_prefill_equals_the_models_own_forward(mt):
    model, ids = _model(mt), _ids()
    hf = _hf(model, mt)
    assert layer_windows(model.config, hf.n_layers) == WINDOWS[mt]
    own = _own(model, ids)
    h = PrefillHandler("sparse", predict_fn(make_block_predictor("full")), block_size=BS, measure=True, rows=64,
                       windows=layer_windows(model.config, hf.n_layers))
    logits = timed_forward(hf, h, ids)[0]
    torch.testing.assert_close(logits, own, atol=1e-5, rtol=0)
    assert h.layer_windows == dict(enumerate(WINDOWS[mt]))
    assert h.mask_probe.windows >= {W}  # the model asked for a window-16 causal mask
    for r in h.records:  # reference = windowed exact attention: the full band keeps all of it
        assert min(r.recall) > 1 - 1e-12 and max(r.out_error) < 1e-10
    # the window matters here: the same weights with a window longer than the input give other logits
    plain = model_zoo.build(mt, cls=LMS[mt], sliding_window=4 * N).double()
    assert (_own(plain, ids) - own).abs().max() > 1e-3
    res = run_prefill(_cfg(), hf=hf, ids=ids)
    s = res["summary"]
    assert res["sliding_windows"] == WINDOWS[mt]
    assert abs(s["loss_sparse"] - window_loss(own, ids)) < 1e-5 and abs(s["loss_dense"] - s["loss_sparse"]) < 1e-5
    assert s["recall_min_head"] > 1 - 1e-9


def test_multimodal_gemma3_text_tower_prefill_equals_its_own_forward():
    """Gemma3ForConditionalGeneration (the 4B-27B checkpoints' form): windows read from text_config."""
    if not model_zoo.available("gemma3"):
        pytest.skip("gemma3: not in the installed transformers")
    model = model_zoo.build("gemma3", cls="Gemma3ForConditionalGeneration", mm_tokens_per_image=4,
                            text_config=model_zoo._gemma(sliding_window=W, sliding_window_pattern=2),
                            vision_config=model_zoo._vision(num_channels=3)).double()
    ids = _ids(3)
    hf = _hf(model, "gemma3")
    assert hf.causal and layer_windows(model.config, hf.n_layers) == [W, None]
    res = run_prefill(_cfg(), hf=hf, ids=ids)
    assert res["sliding_windows"] == [W, None]
    assert abs(res["summary"]["loss_sparse"] - window_loss(_own(model, ids), ids)) < 1e-5


def test_gemma2_softcap_is_applied_in_prefill():
    """Gemma2 caps scores at 20 (|s| reaches ~20 here): without the score_mod the logits differ."""
    model, ids = _model("gemma2"), _ids(1)
    hf = _hf(model, "gemma2")
    h = PrefillHandler("sparse", predict_fn(make_block_predictor("full")), block_size=BS)
    torch.testing.assert_close(timed_forward(hf, h, ids)[0], _own(model, ids), atol=1e-5, rtol=0)
    uncapped = model_zoo.build("gemma2", cls=LMS["gemma2"], sliding_window=W, attn_logit_softcapping=None).double()
    assert (_own(uncapped, ids) - _own(model, ids)).abs().max() > 1e-3


class _Call:
    def __init__(self, q, k, v, window):
        self.layer, self.query, self.key, self.value, self.window = 0, q, k, v, window
        self.valid = self.bias = self.softcap = None
        self.scaling = q.shape[-1] ** -0.5


def _band_mask(n, w):
    i = torch.arange(n).view(-1, 1)
    return (i >= i.view(1, -1)) & (i - i.view(1, -1) < w)


@pytest.mark.parametrize("w", [16, 24, 40])
def test_oracle_pattern_stays_in_the_window_and_recall_is_against_windowed_attention(w):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, N, 8, generator=g, dtype=torch.float64) * s for s in (2.0, 2.0, 1.0))
    h = PrefillHandler("sparse", predict_fn(make_block_predictor("oracle")), recall=0.8, block_size=BS,
                       measure=True, rows=N)
    seen = []
    run = h._sparse
    h._sparse = lambda *a, **kw: (seen.append(a[3]), run(*a, **kw))[1]
    out = h(_Call(q, k, v, w))
    pattern = seen[0]
    touched, full = band_block_graph(N // BS, BS, w)
    graph = pattern.block_graph()
    assert not bool((graph & ~touched).any())  # no tile outside the window is executed
    assert bool((graph & ~full & ~torch.eye(N // BS, dtype=torch.bool)).any()) or w == 40  # edge tiles partial
    if w > 16:
        assert float(graph.float().mean()) < float(touched.float().mean())  # the oracle dropped some band tiles
    # independent float64 reference: softmax over the kept tiles' windowed causal pairs
    allowed = expand_block_graph(graph, BS) & _band_mask(N, w)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    exact = torch.softmax(s.masked_fill(~_band_mask(N, w), float("-inf")), -1)  # the model's windowed attention
    recall = (exact * allowed).sum(-1).mean(-1)[0]  # (H,) every row
    torch.testing.assert_close(torch.tensor(h.records[0].recall, dtype=torch.float64), recall, atol=1e-9, rtol=0)
    assert float(recall.min()) >= 0.8 - 1e-9  # the windowed oracle keeps >= p of each block row's mass


def test_full_predictor_executes_exactly_the_window_band():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, N, 8, generator=g, dtype=torch.float64) for _ in range(3))
    h = PrefillHandler("sparse", predict_fn(make_block_predictor("full")), block_size=BS)
    seen = []
    run = h._sparse
    h._sparse = lambda *a, **kw: (seen.append(a[3]), run(*a, **kw))[1]
    out = h(_Call(q, k, v, 20))
    touched, full = band_block_graph(N // BS, BS, 20)
    assert torch.equal(seen[0].block_graph()[0, 0], touched) and int(touched.sum()) == 4 + 3 + 2  # d = 0, 1, 2
    assert torch.equal(full, torch.zeros_like(full))  # 16-token tiles, window 20: no tile is wholly inside
    s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    ref = torch.softmax(s.masked_fill(~_band_mask(N, 20), float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_oracle_prefill_on_a_windowed_model_meets_recall():
    model, ids = _model("mistral", sliding_window=40), _ids(2)  # 4 band tiles per block row
    res = run_prefill(_cfg(predictor="oracle", recall=0.8), hf=_hf(model, "mistral"), ids=ids)
    s = res["summary"]
    assert res["sliding_windows"] == [40, 40]
    assert s["recall_mean"] >= 0.8 and s["density_predicted_mean"] < 1.0
    assert s["loss_sparse"] != s["loss_dense"]


def test_window_disagreement_and_non_causal_masks_are_refused():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g, dtype=torch.float64) for _ in range(3))
    h = PrefillHandler("sparse", predict_fn(make_block_predictor("full")), block_size=BS, windows=[None])
    with pytest.raises(ModelError, match="sliding_window=8"):
        h(_Call(q, k, v, 8))
    probe = MaskProbe()
    probe(q_length=32, kv_length=32, mask_function=lambda b, hh, qi, kv: (kv <= qi) & (kv > qi - 8))
    assert probe.windows == {8}
    assert probe(q_length=32, kv_length=32, mask_function=lambda b, hh, qi, kv: kv <= qi) is None
    assert probe.windows == {8, None}
    bidir = probe(q_length=32, kv_length=32, mask_function=lambda b, hh, qi, kv: (qi - kv).abs() < 8)
    assert bidir is not None and bool(bidir[0, 0, 0, 5]) and probe.windows == {8, None}  # built, not recorded
    call = _Call(q, k, v, None)
    call.valid = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    with pytest.raises(ModelError, match="explicit mask"):  # a layer that uses such a mask is refused
        PrefillHandler("sparse", predict_fn(make_block_predictor("full")), block_size=BS)(call)
    with pytest.raises(ModelError, match="padding"):
        probe(q_length=4, kv_length=4, attention_mask=torch.tensor([[1, 1, 0, 1]]))


def test_prefill_cli_on_a_saved_gemma2_folder(tmp_path):
    """`attnlab sparsity prefill` loads a softcapped sliding-window Gemma2 checkpoint (eager, with its tokenizer)
    and runs it beyond the window."""
    from typer.testing import CliRunner

    from attnlab.cli import app
    from test_model_families import _minilm_tokenizer, _save

    if not model_zoo.available("gemma2"):
        pytest.skip("gemma2: not in the installed transformers")
    path = _save(tmp_path, "gemma2", cls="Gemma2ForCausalLM", vocab_size=len(_minilm_tokenizer()), sliding_window=W)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["sparsity", "prefill", "--model", path, "--seq-len", str(N), "--block-size", str(BS),
                                 "--predictor", "oracle", "--recall", "0.9", "--windows", "1", "--reps", "1",
                                 "--rows", "32", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads(out.read_text())
    assert res["sliding_windows"] == [W, None] and "window 16" in r.output
    assert res["summary"]["recall_mean"] >= 0.9 and abs(res["summary"]["loss_delta"]) < 0.05


PLAIN = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "opt": "OPTForCausalLM",
         "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "bart": "BartForCausalLM"}


@pytest.mark.parametrize("mt", list(PLAIN))
def test_plain_causal_families_through_the_mask_probe_equal_their_own_forward(mt):
    """The mask probe replaces SDPA's mask function for every prefill model: plain causal families still match
    (BART's causal LM also builds an unused bidirectional cross-attention mask, which is built, not refused)."""
    if not model_zoo.available(mt):
        pytest.skip(f"{mt}: not in the installed transformers")
    model, ids = model_zoo.build(mt, cls=PLAIN[mt]).double(), _ids(4)
    hf = _hf(model, mt)
    h = PrefillHandler("sparse", predict_fn(make_block_predictor("full")), block_size=BS,
                       windows=layer_windows(model.config, hf.n_layers))
    torch.testing.assert_close(timed_forward(hf, h, ids)[0], _own(model, ids), atol=1e-10, rtol=0)
    assert h.layer_windows == {0: None, 1: None} and None in h.mask_probe.windows


@pytest.mark.parametrize("bs,w", [(16, 1), (16, 15), (16, 16), (16, 17), (16, 33), (32, 48), (16, 200)])
def test_band_tiles_match_the_token_band(bs, w):
    """Touched tiles hold some allowed pair; full tiles (run without mask_mod on the GPU) hold only allowed
    pairs: checked against the token-level band, since the CPU exact path cannot tell full from partial."""
    from attnlab.blocksparse.blockmask import pattern_from_block_graph, window_pattern

    n = 8 * bs
    band = _band_mask(n, w).view(n // bs, bs, n // bs, bs)
    touched, full = band_block_graph(n // bs, bs, w)
    assert torch.equal(touched, band.any(3).any(1)) and torch.equal(full, band.all(3).all(1))
    p = window_pattern(pattern_from_block_graph(torch.ones(1, 1, n // bs, n // bs, dtype=torch.bool), bs, True), w)
    assert int(p.kv.full_kv_num_blocks.sum()) == int(full.sum())
    assert int(p.kv.kv_num_blocks.sum()) == int((touched & ~full).sum())
    assert torch.equal(p.token_mask()[0, 0], _band_mask(n, w))
    rows = torch.tensor([0, bs - 1, bs, n - 1])
    assert torch.equal(p.allowed_rows(rows)[0, 0], _band_mask(n, w)[rows])
    i = torch.arange(n)
    assert torch.equal(p.mask_mod()(0, 0, i.view(-1, 1), i.view(1, -1)), _band_mask(n, w))  # the kernel's mask_mod


@pytest.mark.parametrize("window,softcap", [(None, 5.0), (40, None), (40, 5.0)])
def test_flex_attention_evaluates_our_mask_mod_and_softcap_score_mod_like_the_reference(window, softcap):
    """FlexAttention itself (eager on CPU; it applies mask_mod and score_mod to every pair, tiles aside) on
    the window band with the softcap score_mod equals the exact float64 path (the order scale -> cap -> mask)."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from attnlab.blocksparse.flex import run_pattern, softcap_score_mod
    from attnlab.blocksparse.prefill.handler import band_pattern

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g) * s for s in (3.0, 3.0, 1.0))
    p = band_pattern(1, 2, 128, BS, window, q.device)
    smod = softcap_score_mod(softcap) if softcap else None
    out = flex.flex_attention(q, k, v, score_mod=smod, block_mask=p.block_mask(), scale=0.25)
    ref = run_pattern(q.double(), k.double(), v.double(), p, "dense", 0.25, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    uncapped = run_pattern(q.double(), k.double(), v.double(), p, "dense", 0.25)
    assert softcap is None or (uncapped - ref).abs().max() > 1e-2  # the cap matters at these scores
