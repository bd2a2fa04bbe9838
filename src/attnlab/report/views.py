"""Attention views for the report: what users of BertViz and attention-gym expect to see.

* :func:`save_views` (called by ``spectrum`` runs) keeps one window's attention probabilities per layer
  and head, its tokens, and the block mask that a registered overlay (:data:`VIEW_OVERLAYS`; by default
  ``sparse_attention``'s pooled budget predictor, from :mod:`attnlab.blocksparse.views`) picks for it, in ``views.safetensors`` (a few hundred KB);
* :func:`render_section` draws them: token-labelled heatmaps per layer and head, and the block mask over
  the attention mass it covers;
* :func:`eigenvector_figure` draws the top eigenvectors of score rows as rows (from spectrum.safetensors);
* :func:`save_sparsity_views` / :func:`sparsity_figures` overlay predicted and gold entmax graphs.

Long texts are cropped to the first ``max_tokens`` tokens (queries and keys), with a note saying so.
"""

from __future__ import annotations

import html
import logging
from typing import Any, Optional, Sequence

import numpy as np

from ..io import RunDir, read_tensors, write_tensors
from .block_view import block_figure, oracle_tiles  # noqa: F401  (oracle_tiles re-exported)

log = logging.getLogger(__name__)

VIEWS = "views.safetensors"
SPARSITY_VIEWS = "sparsity_views.safetensors"
MAX_TOKENS = 40  # tokens shown per heatmap axis (labels stay readable)
MAX_HEADS = 12  # heads drawn per layer
MAX_LABELS = 24  # token labels per heatmap axis (every k-th token beyond this, so labels never overlap)
LOG_FLOOR = 1e-3  # heatmap colour scale: log from this probability to the largest (small weights stay visible)


def thin_labels(tokens: Sequence[str], max_labels: int = MAX_LABELS) -> list[str]:
    """Every k-th token label (the others blank) so that at most ``max_labels`` are drawn per axis."""
    step = max(1, -(-len(tokens) // max_labels))
    return [t if i % step == 0 else "" for i, t in enumerate(tokens)]


def heads_note(heads: Sequence[int], n_heads: Optional[int]) -> str:
    """'heads 0-3 of 12 (the first 4)' / 'all 12 heads' / 'heads 0, 5': which heads a figure shows, in words."""
    hs = list(heads)
    if n_heads is not None and hs == list(range(n_heads)):
        return f"all {n_heads} heads"
    run = hs == list(range(hs[0], hs[0] + len(hs))) and len(hs) > 2
    names = f"{hs[0]}&ndash;{hs[-1]}" if run else ", ".join(str(h) for h in hs)
    return f"heads {names}" + (f" of {n_heads}" if n_heads else "")


def _tokens(model: Any, ids: Sequence[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [str(int(i)) for i in ids]
    return [t.replace("\u0120", "_").replace("\u2581", "_") for t in tok.convert_ids_to_tokens([int(i) for i in ids])]


def _n_heads(model: Any, default: int) -> int:
    """Heads per layer of ``model`` (for "heads 0-3 of 12" captions), or ``default`` when it does not say."""
    try:
        from ..capture.run import n_heads_of

        return int(n_heads_of(model))
    except Exception:  # noqa: BLE001  (any model object: the caption then names the drawn heads only)
        return default


def save_views(run: RunDir, model: Any, window: Any, layers: Sequence[int], heads: Sequence[int],
               max_tokens: int = MAX_TOKENS, block_size: Optional[int] = None, budget: float = 0.25,
               source: str = "the first window of the spectrum run") -> None:
    """Save one window's attention (per layer and head), tokens and predicted block mask to views.safetensors."""
    import torch

    from ..capture.dump import capture_scores

    window = window.reshape(1, -1)
    n = int(window.shape[1])
    heads = list(heads)[:MAX_HEADS]
    cap = capture_scores(model, window, list(layers), heads, batch_size=1, with_qk=True)
    from ..validate import at_least

    at_least(1)(max_tokens, "--max-tokens")
    # about 8 tiles per axis; a length that is no multiple of the tile (a prime, say) is zero-padded up to one
    # instead of shrinking the tile to 1 token (N^2 tiles: minutes at a few hundred tokens)
    bs = block_size or max(4, -(-n // 8))
    nb = -(-n // bs)
    pad = nb * bs - n
    show = min(n, max_tokens)
    tensors: dict[str, torch.Tensor] = {}
    overlay = _overlay("blocks")
    for l in layers:
        s = cap[f"scores.{l}"][0].double()  # (H, N, N), -inf where masked
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        tensors[f"attn.{l}"] = p[:, :show, :show].float()
        q, k = (torch.nn.functional.pad(cap[f"{w}.{l}"], (0, 0, 0, pad)) for w in ("query", "key"))
        tensors[f"blocks.{l}"] = overlay(q, k, bs, budget).to(torch.uint8)
        pp = torch.nn.functional.pad(p, (0, pad, 0, pad))
        tensors[f"block_mass.{l}"] = pp.reshape(len(heads), nb, bs, nb, bs).sum((2, 4)).float() / n
    ids = [int(i) for i in window[0]]
    meta = {"tokens": _tokens(model, ids), "layers": list(layers), "heads": heads, "seq_len": n, "shown": show,
            "n_heads": _n_heads(model, len(heads)),
            "source": source,
            "block_size": bs, "budget": budget, "padded_tokens": pad,
            "predictor": overlay.describe(bs, budget)}
    write_tensors(run.file(VIEWS), tensors, meta)


#: Overlays drawn over the attention views, by name: 'module:object' references resolved on use (like the
#: report's sections), so the view code and the runs that save views never import the packages providing
#: them. An overlay is callable as ``(q, k, block_size, budget) -> (H, nb, nb) bool`` block graph and has
#: ``describe(block_size, budget) -> str``.
VIEW_OVERLAYS: dict[str, str] = {"blocks": "attnlab.blocksparse.views:PREDICTED_BLOCKS"}


def _overlay(name: str) -> Any:
    import importlib

    module, obj = VIEW_OVERLAYS[name].split(":")
    return getattr(importlib.import_module(module), obj)


def attention_views(out: str, text: str, model: Any = "minilm", layers: Optional[Sequence[int]] = None,
                    heads: Optional[Sequence[int]] = None, max_tokens: int = MAX_TOKENS, device: str = "cpu",
                    budget: float = 0.25) -> dict[str, Any]:
    """Attention views of your own ``text`` into run directory ``out`` (views.safetensors; the report draws them).

    The text is tokenized as the model does (special tokens included) and cut at the model's maximum length;
    heatmaps show its first ``max_tokens`` tokens. Returns the saved metadata.
    """
    from ..capture.hf import check_heads, check_layers
    from ..capture.run import n_heads_of, n_layers_of, resolve_model
    from ..errors import ConfigError

    if not text or not text.strip():
        raise ConfigError("--text is empty: give the text whose attention to draw")
    m = resolve_model(model, device, 1)
    tok = getattr(m, "tokenizer", None)
    if tok is None:
        raise ConfigError("this model has no tokenizer: call save_views(run, model, token_ids, ...) directly")
    ids = tok(text, truncation=True, max_length=m.max_len, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] < 2:
        raise ConfigError(f"--text {text!r} gives fewer than 2 tokens")
    layers = check_layers(list(layers) if layers is not None else None, n_layers_of(m))
    heads = check_heads(list(heads) if heads is not None else None, n_heads_of(m))
    run = RunDir(out)
    save_views(run, m, ids[0], layers, heads, max_tokens=max_tokens, budget=budget, source="your text")
    run.write_config("views", {"model": model if isinstance(model, str) else type(model).__name__, "text": text,
                               "layers": layers, "heads": heads, "max_tokens": max_tokens, "budget": budget})
    return read_tensors(run.file(VIEWS))[1]


def _heads_grid(n_heads: int, ncols: int = 4):
    import matplotlib.pyplot as plt

    ncols = min(ncols, n_heads)
    nrows = (n_heads + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[n_heads:]:
        ax.axis("off")
    return fig, axes


def attention_figure(attn: np.ndarray, tokens: Sequence[str], layer: int, heads: Sequence[int]) -> str:
    """Token-labelled heatmaps of one layer's heads (rows: queries, columns: keys) as a data URI: a log colour
    scale (small weights stay visible in every head) and at most :data:`MAX_LABELS` labels per axis."""
    from matplotlib.colors import LogNorm

    from .html import png_data_uri

    fig, axes = _heads_grid(len(heads))
    n = attn.shape[-1]
    labels = thin_labels(list(tokens[:n]))
    fs = 6 if n > 16 else 7
    ncols = axes.shape[1]
    norm = LogNorm(vmin=LOG_FLOOR, vmax=max(2 * LOG_FLOOR, float(attn.max())), clip=True)
    im = None
    for i, h in enumerate(heads):
        ax = axes.flat[i]
        im = ax.imshow(np.maximum(attn[i], LOG_FLOOR), cmap="Blues", norm=norm, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {h}", fontsize=8)
        # token labels on the outer panels only (left column: queries, bottom row: keys)
        bottom = i + ncols >= len(heads)
        ax.set_xticks(range(n), labels if bottom else [""] * n, rotation=90, fontsize=fs)
        ax.set_yticks(range(n), labels if i % ncols == 0 else [""] * n, fontsize=fs)
        ax.tick_params(length=0)
    fig.colorbar(im, ax=axes, shrink=0.6, label=f"attention probability, log scale (below {LOG_FLOOR:g} as {LOG_FLOOR:g})")
    return png_data_uri(fig)


def render_section(run: RunDir) -> str:
    """The 'Attention views' section: per-layer heatmaps with token labels, and sparse_attention's block mask."""
    from .html import figure, toggles

    path = run.file(VIEWS)
    if not path.exists():
        return ""
    tensors, meta = read_tensors(path)
    layers, heads, tokens = meta["layers"], meta["heads"], meta["tokens"]
    n, show, bs = meta["seq_len"], meta["shown"], meta["block_size"]
    crop = (f" Only the first {show} of {n} tokens are drawn (queries and keys), so rows need not sum to 1."
            if show < n else "")
    text = html.escape(" ".join(tokens[:show]))
    parts = [f'<p>Attention on {html.escape(meta.get("source", "one window"))} ({n} tokens): <code>{text}</code>{"&hellip;" if show < n else ""}'
             f"</p><p class=\"note\">Rows are queries, columns keys, colour the softmax probability.{crop} "
             "Tick layers to show (one is shown at first):</p>",
             toggles("views-attn", [f"layer {l}" for l in layers], "layers", on=[f"layer {layers[0]}"])]
    figs = []
    for l in layers:
        uri = attention_figure(tensors[f"attn.{l}"].numpy(), tokens, l, heads)
        figs.append(figure(uri, f"Attention of layer {l} ({heads_note(heads, meta.get('n_heads'))}) on the window "
                                f"above, token labels on both axes (every label when they fit, else every k-th); "
                                f"log colour scale.", group=f"layer {l}", hidden=l != layers[0]))
    parts.append(f'<div id="views-attn">{"".join(figs)}</div>')
    parts.append("<h3>Block mask of <code>sparse_attention</code></h3>"
                 f"<p class=\"note\">Tiles of {bs}&times;{bs} tokens that {html.escape(meta['predictor'])} keeps "
                 f"for this window (filled red; budget {meta['budget']:g} = at most that share of key blocks per "
                 "query block), beside the oracle that keeps the same number of tiles per query block by exact "
                 "attention mass. Shade: the tile's attention mass; dropped tiles grey. Titles give the tiles "
                 "computed and the share of attention mass they cover.</p>")
    parts.append(toggles("views-blocks", [f"layer {l}" for l in layers], "layers", on=[f"layer {layers[-1]}"]))
    bfigs = [figure(block_figure(tensors[f"blocks.{l}"].numpy(), tensors[f"block_mass.{l}"].numpy(), l, heads, bs),
                    f"Layer {l}, {heads_note(heads, meta.get('n_heads'))}: predicted block mask (left in each panel) "
                    f"and the oracle at the same tile count per query block (right); columns are key blocks.",
                    group=f"layer {l}",
                    hidden=l != layers[-1])
             for l in layers]
    parts.append(f'<div id="views-blocks">{"".join(bfigs)}</div>')
    return "".join(parts)


def render_capture(run: RunDir) -> str:
    """The 'capture' section: what capture.safetensors holds and how to load it."""
    from .html import table

    sec = run.section("capture") or {}
    model = sec.get("model", {})
    return (f"<p>{sec.get('n_sequences')} windows of {sec.get('seq_len')} tokens from "
            f"<b>{html.escape(str(model.get('name')))}</b>, layers {sec.get('layers')}, heads {sec.get('heads')}: raw "
            f"pre-softmax scores (scaled and masked as the model does, -inf where masked) in "
            f"<code>{html.escape(str(sec.get('file')))}</code>. Load with "
            "<code>attnlab.io.read_tensors(path)</code>.</p>"
            + table(["tensor"], [[t] for t in sec.get("tensors", [])]))


def eigenvector_figure(run: RunDir, res: dict[str, Any], n_vectors: int = 8) -> Optional[str]:
    """Top eigenvectors of each layer's pooled score-row covariance, drawn as rows (data URI), or None."""
    import matplotlib.pyplot as plt

    from ..spectral.files import TENSORS
    from .html import png_data_uri

    path = run.file(TENSORS)
    if not path.exists():
        return None
    tensors, _ = read_tensors(path)
    layers = [l for l in res["layers"] if f"rows.basis.layer.{l}" in tensors]
    if not layers:
        return None
    ncols = min(3, len(layers))
    nrows = (len(layers) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.2 * nrows + 0.6), squeeze=False,
                             layout="constrained")  # titles never overlap the row above
    im = None
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for i, l in enumerate(layers):
        b = tensors[f"rows.basis.layer.{l}"].numpy().T[:n_vectors]  # (k, N): one eigenvector per row
        ax = axes.flat[i]
        lim = float(np.abs(b).max()) or 1.0
        im = ax.imshow(b, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_ylabel("eigenvector #", fontsize=8)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_yticks(range(len(b)), [str(j + 1) for j in range(len(b))], fontsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8, label="component of unit eigenvector")
    return png_data_uri(fig)


# ---------------------------------------------------------------------------------------------------------
# Sparsity: predicted vs gold entmax graphs
# ---------------------------------------------------------------------------------------------------------


def save_sparsity_views(run: RunDir, fitted: dict[str, list], ev: list, op: dict[str, dict],
                        max_tokens: int = 48, max_heads: int = 4) -> None:
    """Predicted and gold graphs of the first evaluation window, every layer, the first heads, each method
    at its operating point closest to sparsity 0.9 -> sparsity_views.safetensors."""
    import torch

    tensors = {}
    heads = list(range(min(max_heads, ev[0].q.shape[1])))
    n = ev[0].n
    show = min(n, max_tokens)
    for l, d in enumerate(ev):
        v = None if d.valid is None else d.valid[:1]
        tensors[f"gold.{l}"] = d.gold[0, heads, :show, :show].to(torch.uint8)
        if v is not None:
            tensors[f"valid.{l}"] = v.expand(1, d.q.shape[1], n, n)[0, heads, :show, :show].to(torch.uint8)
        for m, preds in fitted.items():
            g = preds[l].with_knob(op[m]["knob"]).predict(d.q[:1], d.k[:1], v)
            tensors[f"pred.{m}.{l}"] = g[0, heads, :show, :show].to(torch.uint8)
    write_tensors(run.file(SPARSITY_VIEWS), tensors,
                  {"methods": list(fitted), "layers": list(range(len(ev))), "heads": heads, "seq_len": n, "shown": show,
                   "operating_points": op, "n_heads": int(ev[0].q.shape[1])})


def overlay_figure(gold: np.ndarray, pred: np.ndarray, valid: Optional[np.ndarray], method: str, layers: Sequence[int],
                   heads: Sequence[int], knob: Any) -> str:
    """Hit (green) / miss (red) / extra (blue) cells of predicted vs gold graphs, layers x heads panels."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .html import png_data_uri

    nl, nh = len(layers), len(heads)
    fig, axes = plt.subplots(nl, nh, figsize=(2.0 * nh + 0.5, 2.1 * nl + 0.6), squeeze=False)
    cmap = ListedColormap(["white", "#2ca02c", "#d62728", "#7fb2e5", "#dddddd"])
    for i, l in enumerate(layers):
        for j, h in enumerate(heads):
            g, p = gold[i][j].astype(bool), pred[i][j].astype(bool)
            code = np.zeros(g.shape, dtype=int)
            code[g & p], code[g & ~p], code[~g & p] = 1, 2, 3
            if valid is not None:
                code[~valid[i][j].astype(bool)] = 4
            ax = axes[i][j]
            ax.imshow(code, cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
            rec = (g & p).sum() / max(g.sum(), 1)
            ax.set_title(f"L{l} H{h} recall {rec:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.legend(handles=[Patch(color="#2ca02c", label="hit (gold and predicted)"),
                        Patch(color="#d62728", label="miss (gold, not predicted)"),
                        Patch(color="#7fb2e5", label="extra (predicted, not gold)"),
                        Patch(color="#dddddd", label="masked")],
               loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"{method} (knob {knob}) vs gold entmax graph; rows: queries, columns: keys", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    return png_data_uri(fig)


def sparsity_figures(run: RunDir) -> str:
    """HTML of the predicted-vs-gold overlays (with method toggles), or '' when the run saved none."""
    from .html import figure, toggles

    path = run.file(SPARSITY_VIEWS)
    if not path.exists():
        return ""
    t, meta = read_tensors(path)
    layers, heads, methods = meta["layers"], meta["heads"], meta["methods"]
    valid = [[t[f"valid.{l}"][j].numpy() for j in range(len(heads))] for l in layers] if f"valid.{layers[0]}" in t else None
    gold = [[t[f"gold.{l}"][j].numpy() for j in range(len(heads))] for l in layers]
    figs = []
    for m in methods:
        if f"pred.{m}.{layers[0]}" not in t:
            continue
        pred = [[t[f"pred.{m}.{l}"][j].numpy() for j in range(len(heads))] for l in layers]
        op = meta["operating_points"].get(m, {})
        uri = overlay_figure(gold, pred, valid, m, layers, heads, op.get("knob"))
        figs.append(figure(uri, f"{html.escape(m)} at its operating point closest to sparsity 0.9 "
                                f"(measured {op.get('sparsity', float('nan')):.2f}), first evaluation window.", group=m,
                          hidden=m != methods[0]))
    crop = (f" First {meta['shown']} of {meta['seq_len']} tokens shown." if meta["shown"] < meta["seq_len"] else "")
    crop += f" Shown: {heads_note(heads, meta.get('n_heads'))}" + (" (the first ones)." if meta.get("n_heads", 0) > len(heads)
                                                                   else ".")
    return ("<h3>Predicted vs gold graphs</h3><p class=\"note\">Green: gold edge predicted (hit); red: gold edge "
            f"missed; blue: predicted pair outside the gold graph (extra, costs compute only).{crop}</p>"
            + toggles("sp-overlay", [m for m in methods], "methods", on=methods[:1]) + f'<div id="sp-overlay">{"".join(figs)}</div>')
