"""The block-mask figure of the attention views: the tiles a block predictor keeps (filled) beside the oracle that
keeps as many tiles per query block by exact attention mass."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["block_figure", "oracle_tiles"]


def oracle_tiles(mass: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The oracle at the predictor's budget: in each query block (row), the same number of key tiles as
    ``kept`` has there, chosen by exact attention mass (the most mass any pattern of that size can cover)."""
    out = np.zeros_like(kept, dtype=bool)
    for r in range(mass.shape[0]):
        k = int(kept[r].sum())
        if k:
            out[r, np.argsort(-mass[r], kind="stable")[:k]] = True
    return out


def _tiles_image(mass: np.ndarray, kept: np.ndarray, vmax: float, px: int = 8) -> np.ndarray:
    """RGB image, ``px`` pixels per tile with a white border: kept tiles filled red, dropped ones grey (shade = the
    tile's attention mass), so that one kept tile never looks like two."""
    import matplotlib.pyplot as plt

    x = np.clip(mass / max(vmax, 1e-12), 0.0, 1.0)
    rgb = np.where(kept[..., None], plt.get_cmap("Reds")(0.25 + 0.75 * x), plt.get_cmap("Greys")(0.05 + 0.6 * x))[..., :3]
    img = np.kron(rgb, np.ones((px, px, 1)))
    img[px - 1::px, :, :] = 1.0
    img[:, px - 1::px, :] = 1.0
    return img


def block_figure(blocks: np.ndarray, mass: np.ndarray, layer: int, heads: Sequence[int], block_size: int) -> str:
    """Per head, the predicted block mask (left: kept tiles filled red, dropped grey, shade = exact attention mass of
    the tile) beside the oracle with the same number of tiles per query block (right), as a data URI."""
    from matplotlib.patches import Patch

    from .html import png_data_uri

    import matplotlib.pyplot as plt

    ncols = min(3, len(heads))
    nrows = -(-len(heads) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.2 * nrows + 0.5), squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    vmax, px = float(mass.max()), 8
    for i, h in enumerate(heads):
        m, kept = mass[i], blocks[i].astype(bool)
        oracle = oracle_tiles(m, kept)
        total = max(float(m.sum()), 1e-12)
        left, right = _tiles_image(m, kept, vmax, px), _tiles_image(m, oracle, vmax, px)
        gap = np.ones((left.shape[0], 2 * px, 3))
        ax = axes.flat[i]
        ax.imshow(np.concatenate([left, gap, right], axis=1), interpolation="nearest")
        ax.set_xticks([left.shape[1] / 2, left.shape[1] + 2 * px + right.shape[1] / 2], ["predicted", "oracle"],
                      fontsize=7)
        ax.set_yticks([])
        ax.tick_params(length=0)
        share = lambda t: float((m * t).sum()) / total  # noqa: E731
        ax.set_title(f"L{layer} H{h}: {int(kept.sum())}/{kept.size} tiles; mass {share(kept):.0%} vs oracle "
                     f"{share(oracle):.0%}", fontsize=7)
        ax.set_ylabel(f"query block ({block_size} tokens)", fontsize=7)
    fig.legend(handles=[Patch(color="#cb181d", label="kept tile (darker: more attention mass)"),
                        Patch(color="#969696", label="dropped tile (darker: more mass lost)")],
               loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.5 / (2.2 * nrows + 0.5) + 0.03, top=0.95, hspace=0.45, wspace=0.15)
    return png_data_uri(fig)
