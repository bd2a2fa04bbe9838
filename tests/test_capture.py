"""Capture: our scores must reproduce the model's own attention probabilities and outputs."""

from __future__ import annotations

import pytest
import torch

from attnlab.capture.corpus import special_tokens, token_windows
from attnlab.capture.dump import capture_scores
from attnlab.capture.hf import attention_hooks, run_forward
from attnlab.errors import ConfigError, CorpusError, ModelError
from conftest import tiny_hf


def _scores_by_layer(hf, ids, mask=None):
    got = {}

    def handler(call):
        got[call.layer] = call.scores()
        return None

    with attention_hooks(hf, handler):
        out = run_forward(hf, ids, mask)
    return got, out


def _eager_reference(hf, ids, mask=None):
    hf.model.set_attn_implementation("eager")
    try:
        return run_forward(hf, ids, mask, output_attentions=True)
    finally:
        hf.model.set_attn_implementation("sdpa")


def test_minilm_scores_match_output_attentions(minilm):
    torch.manual_seed(1)
    ids = torch.randint(1000, 20000, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0  # padding in the second sequence
    scores, out = _scores_by_layer(minilm, ids, mask)
    ref = _eager_reference(minilm, ids, mask)
    assert len(scores) == minilm.n_layers == len(ref.attentions)
    for layer, s in scores.items():
        p = torch.softmax(s, dim=-1)
        assert p.shape == ref.attentions[layer].shape
        torch.testing.assert_close(p[0], ref.attentions[layer][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(p[1, :, :25], ref.attentions[layer][1, :, :25], atol=1e-5, rtol=0)
        assert torch.isneginf(s[1, :, :, 25:]).all()  # padded keys are masked
    # capturing does not change the model's output
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_scores_match_eager(arch):
    hf = tiny_hf(arch)
    ids = torch.randint(0, 100, (2, 17))
    scores, _ = _scores_by_layer(hf, ids)
    ref = _eager_reference(hf, ids)
    for layer, s in scores.items():
        assert torch.isneginf(s[..., 0, 1:]).all(), "causal mask must hide future keys"
        torch.testing.assert_close(torch.softmax(s, -1), ref.attentions[layer], atol=1e-5, rtol=0)


def test_llama_rotary_is_applied():
    """Scores from un-rotated projections would differ; ours must equal the eager (rotary) ones."""
    hf = tiny_hf("llama")
    ids = torch.randint(0, 100, (1, 12))
    scores, _ = _scores_by_layer(hf, ids)
    ref = _eager_reference(hf, ids)
    torch.testing.assert_close(torch.softmax(scores[1], -1), ref.attentions[1], atol=1e-5, rtol=0)


def test_hooks_removed_after_error(minilm):
    ids = torch.randint(1000, 2000, (1, 8))

    def boom(call):
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        with attention_hooks(minilm, boom):
            run_forward(minilm, ids)
    assert minilm.model.config._attn_implementation == "sdpa"
    run_forward(minilm, ids)  # works again, no handler left behind


def test_replacement_output_is_used(minilm):
    ids = torch.randint(1000, 2000, (1, 10))
    base = run_forward(minilm, ids).last_hidden_state
    with attention_hooks(minilm, lambda call: torch.zeros_like(call.query), layers=[0]):
        changed = run_forward(minilm, ids).last_hidden_state
    assert (changed - base).abs().max() > 1e-2


def test_capture_scores_chunked_equals_full(minilm):
    ids = torch.randint(1000, 20000, (3, 24))
    full = capture_scores(minilm, ids, layers=[2], batch_size=3)
    chunked = capture_scores(minilm, ids, layers=[2], batch_size=1)
    torch.testing.assert_close(full["scores.2"], chunked["scores.2"], atol=1e-5, rtol=0)
    assert full["scores.2"].shape == (3, 12, 24, 24)


def test_capture_refuses_huge_request(minilm):
    ids = torch.randint(1000, 2000, (4, 32))
    with pytest.raises(ConfigError, match="n-sequences"):
        capture_scores(minilm, ids, max_bytes=1000)


def test_bad_layers_and_heads(minilm):
    ids = torch.randint(1000, 2000, (1, 8))
    with pytest.raises(ConfigError, match="--layers"):
        capture_scores(minilm, ids, layers=[6])
    with pytest.raises(ConfigError, match="--heads"):
        capture_scores(minilm, ids, heads=[12])


def test_unknown_model():
    from attnlab.capture.hf import load_model

    with pytest.raises(ModelError, match="--model"):
        load_model("./no/such/model")
    with pytest.raises(ModelError, match="--model"):
        load_model("nobody/never-published-model-xyz")


def test_corpus_windows(tmp_path, minilm):
    tok = minilm.tokenizer
    assert special_tokens(tok) == ([tok.cls_token_id], [tok.sep_token_id])
    f = tmp_path / "a.txt"
    f.write_text(" ".join(["word"] * 300))
    w = token_windows(tok, 32, str(f))
    assert w.shape[1] == 32 and (w[:, 0] == tok.cls_token_id).all() and (w[:, -1] == tok.sep_token_id).all()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        token_windows(tok, 32, str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(CorpusError, match="shorter than one sequence"):
        token_windows(tok, 32, str(tmp_path / "short.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(CorpusError, match="binary"):
        token_windows(tok, 32, str(tmp_path / "bin.txt"))
    with pytest.raises(CorpusError, match="no such file"):
        token_windows(tok, 32, str(tmp_path / "missing.txt"))
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "' + "alpha beta " * 100 + '"}\n{"other": 1}\n')
    with pytest.raises(CorpusError, match="text-field"):
        token_windows(tok, 32, str(j))


def test_fit_and_heldout_windows_disjoint(minilm):
    fit = token_windows(minilm.tokenizer, 64, max_windows=40, split="fit")
    held = token_windows(minilm.tokenizer, 64, max_windows=40, split="heldout")
    fit_rows = {tuple(r.tolist()) for r in fit}
    assert not any(tuple(r.tolist()) in fit_rows for r in held)
