"""Whole-matrix spectra (issue 14): exact from the Gram matrix of the samples, checked against numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.errors import ShapeError
from attnlab.spectral.eigen import explained_variance, ranks_for
from attnlab.spectral.stats import gram_covariance


def test_gram_spectrum_matches_numpy_covariance_eigen():
    """Nonzero eigenvalues of the M x M Gram matrix equal those of the D x D sample covariance (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g) @ torch.randn(5, 40, generator=g) + 0.1 * torch.randn(9, 40, generator=g)
    ours = torch.linalg.eigvalsh(gram_covariance(x)).flip(0).numpy()
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy().T)))[::-1]
    np.testing.assert_allclose(ours, ref[:9], rtol=1e-9, atol=1e-10)
    assert abs(ref[9:]).max() < 1e-10  # rank <= M - 1
    with pytest.raises(ShapeError):
        gram_covariance(x[:1])


def test_spectrum_run_exact_whole_matrices_small_model(tmp_path):
    """A spectrum run of our small model keeps every matrix, and its per-head and per-layer (heads concatenated)
    whole-matrix spectra equal numpy's eigenvalues of the flattened, row-centred score matrices."""
    from attnlab.capture.run import stream_attention
    from attnlab.models import SmallTransformer, TransformerConfig
    from attnlab.spectral.run import spectrum
    from attnlab.spectral.stats import row_centre

    torch.manual_seed(0)
    m = SmallTransformer(TransformerConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=2, max_len=8, causal=True))
    w = torch.randint(0, 40, (10, 8))
    res = spectrum(tmp_path / "s", model=m, windows=w, seq_len=8, n_sequences=10, batch_size=4, progress=False,
                   checkpoint_every=1)
    mats = []
    stream_attention(m, w, lambda c: mats.append(row_centre(c.scores().double(), c.valid)) if c.layer == 1 else None,
                     [1], 4, show_progress=False)
    x = torch.cat(mats).reshape(10, 2, 64).numpy()  # (M, heads, N^2)
    for h in range(2):
        ref = np.sort(np.linalg.eigvalsh(np.cov(x[:, h].T)))[::-1][:10]
        fm = res["full_matrix"][f"1.{h}"]
        assert fm["method"] == "exact" and fm["limit"] == 9
        np.testing.assert_allclose(fm["total_variance"], ref.sum(), rtol=1e-5)
        assert fm["k90"] == ranks_for(explained_variance(torch.from_numpy(ref.copy())))["k90"] <= 9
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.reshape(10, -1).T)))[::-1][:10]
    lay = res["full_matrix_layers"]["1"]
    np.testing.assert_allclose(lay["total_variance"], ref.sum(), rtol=1e-5)
    assert lay["k90"] == ranks_for(explained_variance(torch.from_numpy(ref.copy())))["k90"]
    # More windows than --full-exact: the sketch, with its limit stated
    res = spectrum(tmp_path / "t", model=m, windows=w, seq_len=8, n_sequences=10, batch_size=4, progress=False,
                   full_exact=4, sketch_size=3)
    fm = res["full_matrix"]["0.0"]
    assert fm["method"] == "sketch" and fm["limit"] == 3 and "full_matrix_layers" not in res
    from attnlab.io import RunDir
    from attnlab.spectral.report import render_section

    html = render_section(RunDir(tmp_path / "t"))
    assert "whole-matrix k90" in html
    if fm["k90"] > 3:
        assert "not reached within k=3" in html
