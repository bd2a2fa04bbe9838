"""attnlab sparsity prefill: a causal HF model's real forward with block-sparse attention (CPU exact path)."""

from __future__ import annotations


import pytest
import torch

from attnlab.errors import ConfigError, ModelError
from attnlab.blocksparse.flex import masked_attention_reference
from attnlab.blocksparse.prefill import (
    NOTICE_CPU,
    PrefillConfig,
    PrefillHandler,
    head_density,
    make_predictor,
    predictor_names,
    run_prefill,
)


def _cfg(model, **kw):
    base = dict(model=model, seq_len=96, predictor="full", recall=0.9, block_size=16, windows=1, rows=32, reps=1,
                device="cpu")
    base.update(kw)
    return PrefillConfig(**base)


def test_full_pattern_prefill_equals_dense(tiny_lm):
    res = run_prefill(_cfg(tiny_lm))
    s = res["summary"]
    assert NOTICE_CPU in res["notices"]
    assert abs(s["loss_sparse"] - s["loss_dense"]) < 1e-5
    assert s["recall_min_head"] > 1 - 1e-9 and s["out_error_max"] < 1e-5
    assert s["density_predicted_mean"] == pytest.approx(1.0)
    assert len(res["per_head"]["recall"]) == 2 and len(res["per_head"]["recall"][0]) == 4


def test_oracle_prefill_meets_recall_and_changes_loss_a_little(tiny_lm):
    res = run_prefill(_cfg(tiny_lm, predictor="oracle", recall=0.8, seq_len=100))  # 100: padded to 112
    s = res["summary"]
    assert any("zero-padded to 112" in n for n in res["notices"])
    assert s["density_predicted_mean"] < 0.95
    # the oracle keeps >= p of each query block's mean mass; sampled rows see about that
    assert s["recall_min_head"] > 0.7 and s["recall_mean"] >= 0.8
    assert 0 < s["out_error_max"] < 1.0
    assert s["loss_sparse"] != s["loss_dense"]


class _Call:
    def __init__(self, q, k, v):
        self.layer, self.query, self.key, self.value = 0, q, k, v
        self.valid = self.bias = self.softcap = None
        self.scaling = q.shape[-1] ** -0.5


@pytest.mark.parametrize("name,n", [("oracle", 128), ("pooled", 128), ("oracle", 120)])
def test_handler_output_equals_float64_masked_reference(name, n):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64) * s for s in (2.0, 2.0, 1.0))
    predict = make_predictor(name)
    h = PrefillHandler("sparse", predict, recall=0.6, block_size=16, measure=True, rows=16)
    out = h(_Call(q, k, v))
    npad = -(-n // 16) * 16
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, npad - n))  # noqa: E731
    pattern, _ = predict(pad(q), pad(k), 0.6, 16, q.shape[-1] ** -0.5)
    assert float(head_density(pattern).mean()) < 1.0
    ref = masked_attention_reference(pad(q), pad(k), pad(v), pattern.token_mask())[:, :, :n]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    rec = h.records[0]
    assert all(0 < r <= 1 for r in rec.recall) and all(e > 0 for e in rec.out_error)


def test_dense_fallback_above_breakeven_runs_dense():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))
    h = PrefillHandler("sparse", make_predictor("oracle"), recall=0.5, block_size=16, breakeven=0.0, measure=True,
                       rows=16)
    out = h(_Call(q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)
    assert all(h.records[0].dense_fallback) and min(h.records[0].recall) == pytest.approx(1.0)


def test_prefill_bad_inputs(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="--predictor"):
        make_predictor("nope")
    assert "full" in predictor_names() and "oracle" in predictor_names()
    with pytest.raises(ConfigError, match="--recall"):
        _cfg(tiny_lm, recall=1.5)
    with pytest.raises(ConfigError, match="max_position"):
        run_prefill(_cfg(tiny_lm, seq_len=10**5))
    # a non-causal model (BERT encoder)
    from transformers import BertConfig, BertModel, BloomConfig, BloomForCausalLM, ByT5Tokenizer

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=300)).save_pretrained(bert)
    ByT5Tokenizer(extra_ids=0).save_pretrained(bert)
    with pytest.raises(ConfigError, match="not a causal"):
        run_prefill(_cfg(str(bert)))
    # a causal model whose attention does not go through AttentionInterface (BLOOM)
    bloom = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(bloom)
    ByT5Tokenizer(extra_ids=0).save_pretrained(bloom)
    with pytest.raises(ModelError, match="AttentionInterface"):
        run_prefill(_cfg(str(bloom)))


def test_prefill_cli(tiny_lm, tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli import app

    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["sparsity", "prefill", "--model", tiny_lm, "--seq-len", "64", "--block-size", "16",
                                 "--predictor", "oracle", "--recall", "0.9", "--windows", "1", "--reps", "1",
                                 "--rows", "16", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "recall per head" in r.output and "timings are not meaningful" in r.output and out.exists()
    r = CliRunner().invoke(app, ["sparsity", "prefill", "--model", tiny_lm, "--predictor", "nope"])
    assert r.exit_code == 2 and "--predictor" in r.output


@pytest.mark.gpu
def test_prefill_on_cuda_full_pattern_and_breakeven(tiny_lm):
    """On CUDA (FlexAttention kernel, bf16): the full pattern reproduces the dense loss, timings come back,
    the break-even curve is measured and the as-executed run is never a different computation than reported."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    res = run_prefill(_cfg(tiny_lm, seq_len=512, block_size=128, device="cuda", reps=2, windows=2))
    s = res["summary"]
    assert NOTICE_CPU not in res["notices"]
    assert abs(s["loss_sparse"] - s["loss_dense"]) < 2e-2  # bf16 kernels differ in rounding only
    assert s["recall_min_head"] > 1 - 1e-6
    assert 0.0 <= res["breakeven"]["breakeven"] <= 1.0 and res["breakeven"]["curve"]
    assert {"cudnn", "flash"} <= set(s["speedup"]) and s["speedup"]["cudnn"]["attention_ms"] > 0
    res = run_prefill(_cfg(tiny_lm, seq_len=512, block_size=128, device="cuda", predictor="oracle", recall=0.9,
                           reps=1))
    assert res["summary"]["recall_min_head"] > 0.8


def test_prefill_model_without_training_record_uses_its_tokenizer(tiny_lm, tmp_path):
    """Any causal HF folder (no attnlab_lm.json): held-out stdlib text goes through the model's own tokenizer."""
    import shutil

    from attnlab.lm.train import META

    other = tmp_path / "plain"
    shutil.copytree(tiny_lm, other)
    (other / META).unlink()
    res = run_prefill(_cfg(str(other), seq_len=64))
    assert abs(res["summary"]["loss_sparse"] - res["summary"]["loss_dense"]) < 1e-5
    assert 0 < res["summary"]["loss_dense"] < 20
