"""Sparse prefill of a real causal HF model: every attention layer replaced by predicted block-sparse attention.

``run_prefill(PrefillConfig(model=..., seq_len=N, predictor=NAME, recall=p))`` loads the model, takes held-out
text windows of N tokens and runs the model's own forward with each self-attention call routed (through
transformers' ``AttentionInterface``, :func:`attnlab.sources.hf.attention_hooks`) to a handler that

1. predicts a block pattern per layer and head from that call's q and k (a block predictor by name, aiming at
   mean mass recall ``p`` per head);
2. runs FlexAttention on the heads whose predicted density is below the kernel's measured break-even density,
   and dense SDPA (cuDNN) on the others, so no head runs slower than dense;
3. returns that output to the model.

It reports, per layer and head, the density, the recall measured as exact softmax mass kept on sampled query
rows, and the output error against exact dense attention (all on that layer's real inputs); for the whole
forward, the held-out loss against the dense forward and wall times (attention alone, prediction and mask
building included, and the whole forward) against SDPA with the FlashAttention and cuDNN backends. On CPU the
exact masked path runs instead of the kernel and timings are not meaningful (a notice says so).

Under ``torchrun`` the held-out windows are sharded round-robin over ranks (one GPU each): every rank measures
its windows, rank 0's break-even density and dense-layer decision are broadcast so every rank runs the same
policy, and per-window records and timing samples are gathered back in window order, so the numbers equal a
single process's (timings aside).
"""

from __future__ import annotations

from ..._lazy import lazy_package

_EXPORTS = {
    "NOTICE_CPU": "config", "PrefillConfig": "config",
    "breakeven_density": "breakeven",
    "LayerRecord": "handler", "PredictFn": "handler", "PrefillHandler": "handler", "dense_sdpa": "handler",
    "head_density": "handler", "predict_fn": "handler", "sub_pattern": "handler",
    "heldout_windows": "model", "load_causal_model": "model", "prefill_hooks": "model",
    "make_predictor": "runner", "predictor_names": "runner", "run_prefill": "runner",
    "format_summary": "summary",
}

# Names resolve on first use (``attnlab --help`` reads PrefillConfig's fields without importing torch).
lazy_package(__name__, _EXPORTS)
