"""Shared fixtures: the packaged MiniLM (loaded once) and tiny random HF models of other architectures."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads)."""
    from attnlab.capture.hf import load_model

    return load_model("minilm")


def tiny_hf(arch: str, seed: int = 0):
    """A tiny randomly initialised HF model wrapped as HFModel: 'gpt2' (causal) or 'llama' (rotary + GQA)."""
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    from attnlab.capture.hf import HFModel

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64)
        model = GPT2Model(cfg)
        n_heads, head_dim = 4, 8
    elif arch == "llama":
        cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                          intermediate_size=64, vocab_size=100, max_position_embeddings=64)
        model = LlamaModel(cfg)
        n_heads, head_dim = 4, 8
    else:
        raise ValueError(arch)
    model.set_attn_implementation("sdpa")
    model.eval()
    return HFModel(model, None, arch, 2, n_heads, head_dim, 64, True)


def save_tiny_bert(path, n_layers: int = 2, masked_lm: bool = True) -> str:
    """A tiny random BERT (hidden 32, 2 heads, 64 positions) with MiniLM's tokenizer, saved as an HF folder at
    ``path`` for commands that take ``--model``; returns the folder."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    from attnlab.sources.hf import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    (BertForMaskedLM if masked_lm else BertModel)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def spectrum_run(tmp_path_factory, minilm):
    """A tiny finished spectrum run of MiniLM (layers 1 and 3, heads 0-2, 4 windows of 32 tokens) with its views."""
    from attnlab.spectral.run import spectrum

    out = tmp_path_factory.mktemp("rep") / "run"
    spectrum(out, model=minilm, n_sequences=4, seq_len=32, batch_size=2, layers=[1, 3], heads=[0, 1, 2],
             sketch_size=4, progress=False)
    return out


def save_sharp_lm(preset: str, seed: int, folder) -> str:
    """An untrained byte Llama of ``preset`` with sharpened attention (q/k weights x 8, so patterns are not
    uniform), saved as an HF folder under ``folder`` (no training: fast)."""
    import dataclasses

    from attnlab.lm.train import PRESETS, build_model, save_model

    cfg = dataclasses.replace(PRESETS[preset], seed=seed)
    model = build_model(cfg)
    with torch.no_grad():  # sharper attention than the 0.02-std init, so patterns are not uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    out = folder / preset
    save_model(model, out, {"key": cfg.key(), "config": dataclasses.asdict(cfg), "train_loss": 0.0,
                            "heldout_loss": 0.0, "steps": 0, "train_seconds": 0.0})
    return str(out)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest and shared CPUs are not oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """An untrained tiny byte Llama (GQA) with sharpened attention, saved as an HF folder (no training: fast)."""
    return save_sharp_lm("tiny", 3, tmp_path_factory.mktemp("lm"))


@pytest.fixture
def saved_overlaps(monkeypatch):
    """Every matplotlib figure saved while the test runs (PNG files and inline data URIs): (its axes' titles,
    its overlapping text pairs from :func:`attnlab.report.overlap.text_overlaps`)."""
    from matplotlib.figure import Figure

    from attnlab.report.overlap import text_overlaps

    found: list[tuple[str, list]] = []
    orig = Figure.savefig

    def hooked(self, *a, **k):
        found.append((" | ".join(ax.get_title() for ax in self.axes)[:80], text_overlaps(self)))
        return orig(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", hooked)
    return found


def triton_interpreter(module: str):
    """Generator for a module-scoped fixture of the Triton kernel tests: without CUDA, set TRITON_INTERPRET=1 and
    (re)load the kernel ``module`` under it (the variable is read when the kernels are defined), restore after."""
    import importlib
    import sys

    if torch.cuda.is_available():
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    if module in sys.modules:  # loaded compiled (not interpreted) by an earlier test: load it again
        importlib.reload(sys.modules[module])
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
