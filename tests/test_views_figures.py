"""Attention-view figures (issue 29 item 5): filled tiles beside the oracle, thinned labels, named head subsets."""

from __future__ import annotations

import numpy as np

from attnlab.report.views import block_figure, heads_note, oracle_tiles, thin_labels


def test_token_labels_are_thinned():
    labels = thin_labels([f"t{i}" for i in range(40)], max_labels=24)
    shown = [t for t in labels if t]
    assert len(labels) == 40 and len(shown) <= 24 and shown[0] == "t0"
    assert thin_labels(["a", "b"]) == ["a", "b"]


def test_oracle_keeps_the_same_tiles_per_row_by_mass():
    rng = np.random.default_rng(0)
    mass = rng.random((6, 6))
    kept = np.zeros((6, 6), bool)
    kept[np.arange(6), rng.integers(0, 6, 6)] = True
    kept[2, :3] = True
    orc = oracle_tiles(mass, kept)
    assert (orc.sum(1) == kept.sum(1)).all()  # same budget per query block
    assert ((mass * orc).sum(1) >= (mass * kept).sum(1) - 1e-12).all()  # no pattern of that size covers more
    assert orc[2, np.argsort(-mass[2])[:3]].all()


def test_heads_are_named():
    assert heads_note([0, 1, 2, 3], 12) == "heads 0&ndash;3 of 12"
    assert heads_note(list(range(12)), 12) == "all 12 heads"
    assert heads_note([0, 5], 12) == "heads 0, 5 of 12"


def test_block_figure_draws():
    mass = np.random.default_rng(1).random((2, 4, 4))
    blocks = np.eye(4, dtype=np.uint8)[None].repeat(2, 0)
    uri = block_figure(blocks, mass / mass.sum(), 0, [0, 1], 16)
    assert uri.startswith("data:image/png;base64,")
