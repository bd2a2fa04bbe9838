"""Issue 30 parts 2-4: the bounded head's forward against a float64 reference, what one head can compute, the
per-trial attention probe, the cap the norm bound puts on it, the probe against the bound, the figure."""

from __future__ import annotations

import math
from html import escape

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError
from attnlab.io import RunDir
from attnlab.variables.tasks import make_task


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


def _members(task, T, s, ms, seeds=(0,)):
    from attnlab.variables.ensemble import Member

    return [Member(make_task(task, T, s, sd), m, sd) for sd in seeds for m in ms]


def _random_heads(members, d=12, H=2, scale=1.0, seed=0):
    """A BoundedHeads ensemble in float64 with O(1) random weights (not the near-zero init)."""
    from attnlab.variables.ensemble import BoundedHeads

    model = BoundedHeads(members, d, H).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return model


def _reference_logits(model, ids):
    """The bounded head written out position by position in float64: x_t, scores, softmax, z^h, W_c [z^1; ...]."""
    E, B, N = ids.shape
    out = torch.zeros(E, B, 2, dtype=torch.float64)
    for e in range(E):
        for b in range(B):
            x = model.tok[e, ids[e, b]] + model.pos[e]  # (N, d)
            zs = []
            for h in range(model.H):
                q = model.wq[e, h] @ x[0]  # (dh,)
                scores = (model.wk[e, h] @ x.T).T @ q / math.sqrt(model.dh)  # (N,)
                p = torch.softmax(scores, 0)
                zs.append((p[:, None] * (model.wv[e, h] @ x.T).T).sum(0))
            out[e, b] = model.wc[e] @ torch.cat(zs)
    return out


def test_bounded_forward_matches_float64_reference():
    mem = _members("and", 9, 2, [4], seeds=(0, 1, 2))
    model = _random_heads(mem, d=12, H=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2, (3, 5, 10), generator=g)
    ids[..., 0] = 2
    got = model(model.encode(ids).double())
    assert torch.allclose(got, _reference_logits(model, ids), atol=1e-12, rtol=1e-10)


def _bit_inputs(T, i, j, n_other=4, seed=0):
    """n_other random backgrounds, each with the four settings of bits i and j: ids (4 * n_other, T + 1)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_other):
        base = torch.randint(0, 2, (T + 1,), generator=g)
        base[0] = 2
        for a, b in ((0, 0), (1, 1), (1, 0), (0, 1)):
            x = base.clone()
            x[i + 1], x[j + 1] = a, b
            rows.append(x)
    return torch.stack(rows)


def test_one_head_decides_by_an_additive_function_so_cannot_compute_parity():
    """With one head the logit gap is sum_t e^{s_t} g(x_t) / sum_t e^{s_t}; the CLS score s_0 never changes, so
    gap / p_0 is additive over positions: F(00) + F(11) = F(10) + F(01), hence sign(gap) is a linear threshold
    function of the bits and never 2-bit parity. With two heads the identity fails (it is not vacuous)."""
    mem = _members("parity", 12, 2, [4])
    ids = _bit_inputs(12, 3, 7)[None]
    for H, additive in ((1, True), (2, False)):
        model = _random_heads(mem, d=8, H=H, scale=0.7, seed=H)
        logits, p = model(model.encode(ids).double(), return_attention=True)
        gap = (logits[0, :, 1] - logits[0, :, 0]).view(-1, 4)
        p0 = p[0, :, :, 0].view(-1, 4, H)
        if H == 1:
            F = gap / p0[..., 0]
            resid = (F[:, 0] + F[:, 1] - F[:, 2] - F[:, 3]).abs().max()
            assert resid < 1e-9 * F.abs().max()
        else:
            F = gap / p0[..., 0]  # not additive: the two heads have different normalisers
            assert (F[:, 0] + F[:, 1] - F[:, 2] - F[:, 3]).abs().max() > 1e-6 * F.abs().max()  # H = 1 gives ~1e-15
        # parity as a sign pattern: (00, 11) one class, (10, 01) the other
        sign = torch.sign(gap)
        parity_like = (sign[:, 0] == sign[:, 1]) & (sign[:, 2] == sign[:, 3]) & (sign[:, 0] != sign[:, 2])
        if additive:
            assert not bool(parity_like.any())


def test_mass_cap_bounds_every_projected_model_and_tightens_with_the_bound():
    from attnlab.variables.ensemble import Bounds
    from attnlab.variables.probe import mass_cap

    T, s, d, H = 40, 3, 8, 1
    mem = _members("and", T, s, [4], seeds=(0, 1, 2, 3))
    relevant = [list(m.task.relevant_tokens) for m in mem]
    ids = torch.randint(0, 2, (4, 64, T + 1), generator=torch.Generator().manual_seed(3))
    ids[..., 0] = 2
    for qk in (0.5, 2.0, 6.0):
        b = Bounds(emb=1.0, qk=qk, v=1.0, out=1.0)
        cap = mass_cap(T, s, 1.0, qk, d // H)
        for trial in range(3):
            model = _random_heads(mem, d=d, H=H, scale=3.0, seed=10 * trial + int(qk))
            with torch.no_grad():  # push relevant positions towards the query, everything else away
                for e, R in enumerate(relevant):
                    q = model.wk[e, 0].T @ (model.wq[e, 0] @ (model.tok[e, 2] + model.pos[e, 0]))
                    model.pos[e] = -q / q.norm()
                    model.pos[e, R] = q / q.norm()
                    model.tok[e] = 0.0
                    model.tok[e, 2] = q / q.norm()
            model.project(b)
            with torch.no_grad():
                p = model.readout_attention(model.encode(ids).double())  # (E, B, H, N)
            mass = torch.stack([p[e, :, 0][:, R].sum(-1) for e, R in enumerate(relevant)])
            assert float(mass.max()) <= cap + 1e-12
        assert 0 < cap < 1
    assert mass_cap(T, s, 1.0, 0.5, 8) < mass_cap(T, s, 1.0, 2.0, 8) < mass_cap(T, s, 1.0, 6.0, 8)
    assert mass_cap(4096, 3, 1.0, 1.0, 32) < mass_cap(256, 3, 1.0, 1.0, 32)  # longer contexts dilute more
    assert mass_cap(T, s, None, 1.0, 8) == 1.0


def test_every_bounded_trial_records_its_attention_like_the_single_model_probe():
    from attnlab.variables.ensemble import Bounds, EnsembleConfig, bounded_probe, train_ensemble

    mem = _members("and", 16, 2, [64, 96], seeds=(0, 1))
    cfg = EnsembleConfig(kind="bounded", max_steps=60, eval_every=20, n_test=128, n_probe=128, bounds=Bounds(),
                         restarts=0)
    recs, model, chosen = train_ensemble(mem, cfg, return_model=True)
    from attnlab.variables.ensemble import _stack_data

    _, _, sx, _, mt = _stack_data(mem, 128, torch.device("cpu"))
    for e, (r, mb) in enumerate(zip(recs, mem)):
        # the independent single-member probe on the same test inputs gives the recorded mass
        ids = torch.zeros(len(mem), 128, 17, dtype=torch.long)
        ids[e] = sx[mt[e]].long()
        _, p = model(model.encode(ids), return_attention=True)
        R = list(mb.task.relevant_tokens)
        assert r["attn_mass"] == pytest.approx(float(p[e][..., R].sum(-1).mean().detach()), abs=1e-5)
        assert 0 <= r["attn_topk"] <= 1 and r["attn_mass_max"] >= r["attn_mass"] - 1e-9
        assert 0 <= bounded_probe(model, chosen[e], mb.task, n=32)["mass"][0][0] <= 1
    none = train_ensemble(mem[:1], EnsembleConfig(kind="bounded", max_steps=5, n_test=32, n_probe=0, bounds=Bounds()))
    assert "attn_mass" not in none[0]
    with pytest.raises(ConfigError, match="--n-probe"):
        EnsembleConfig(n_probe=-1)


def test_mass_at_mstar_uses_each_seeds_fitted_trial_at_its_mstar():
    from attnlab.variables.probe import mass_at_mstar

    trials = [{"seed": 0, "m": 16, "fit": True, "attn_mass": 0.2, "accuracy": 0.99},
              {"seed": 0, "m": 8, "fit": True, "attn_mass": 0.9, "accuracy": 0.5},
              {"seed": 1, "m": 32, "fit": True, "attn_mass": 0.6, "accuracy": 0.97},
              {"seed": 1, "m": 24, "fit": False, "attn_mass": 0.99, "accuracy": 0.99}]
    got = mass_at_mstar({0: 16, 1: 32, 2: None}, trials)
    assert got["mass_per_seed"] == {"0": 0.2, "1": 0.6} and got["mass_median"] == pytest.approx(0.4)
    assert got["per_seed"]["1"]["m"] == 32 and (got["mass_min"], got["mass_max"]) == (0.2, 0.6)
    assert mass_at_mstar({0: 16}, [{"seed": 0, "m": 16, "accuracy": 1.0}]) is None  # the MLP records no attention


def test_probe_bounds_section_resume_plot_and_report(tmp_path, monkeypatch):
    from attnlab.variables.complexity import SearchConfig
    from attnlab.variables.ensemble import Bounds, EnsembleConfig
    from attnlab.variables.experiment import SweepConfig, run_sweep
    from attnlab.variables.report import render_section

    bounded = EnsembleConfig(kind="bounded", max_steps=30, eval_every=10, n_test=48, n_probe=48, bounds=Bounds(),
                             restarts=0)
    cfg = SweepConfig(task="and", s=2, Ts=[4, 5, 6, 7, 8], seeds=3, bounded=bounded, contrast="mlp",
                      mlp=EnsembleConfig(kind="mlp", lr=0.05, max_steps=30, eval_every=10, n_test=48, restarts=0),
                      search=SearchConfig(m_min=4, m_max=32, rtol=0.3, n_boot=50, doubling=4, points=2),
                      probe_bounds=[0.5, 16.0], probe_m=32)
    sec = run_sweep(cfg, tmp_path / "run", log=lambda _: None)
    pb = sec["probe_bounds"]
    assert (pb["T"], pb["m"]) == (max(r["T"] for r in sec["results"] if r["m_star"]), 32)
    assert [r["qk_bound"] for r in pb["results"]] == [0.5, 16.0]
    tight, loose = pb["results"]
    assert tight["cap"] < loose["cap"] and tight["mass_max"] <= tight["cap"] + 1e-6
    assert tight["norm_qk_median"] <= 0.5 * (1 + 1e-5) and tight["n"] == 3
    assert all(r.get("attn") for r in sec["results"] if r["m_star"] is not None)
    assert all("attn" not in r or r["attn"] is None for r in sec["contrast"]["results"])
    run = RunDir(tmp_path / "run")
    assert run.file("variables_probe_bounds_qk0.5.json").exists()
    assert "variables_probe.png" in sec["plots"] and "variables_mstar.png" in sec["plots"]
    html = render_section(run)
    assert "against the norm bound" in html and "cap" in html and "Verdict" in html
    # the caption of the main figure carries both fits and verdicts
    from attnlab.variables.plots import verdict_line

    for name, block in (("bounded", sec), ("mlp", sec["contrast"])):
        assert escape(verdict_line(name, block)) in html

    def boom(*a, **k):  # a resume retrains nothing
        raise AssertionError("retrained")

    monkeypatch.setattr("attnlab.variables.experiment.train_ensemble", boom)
    again = run_sweep(cfg, tmp_path / "run", resume=True, log=lambda _: None, plots=False)
    assert again["probe_bounds"]["results"][0]["mass_per_seed"] == tight["mass_per_seed"]


def test_probe_bounds_config_errors():
    from attnlab.variables.experiment import SweepConfig

    with pytest.raises(ConfigError, match="--probe-bounds"):
        SweepConfig(probe_bounds=[1.0, 0.0])
    with pytest.raises(ConfigError, match="--probe-bounds"):
        SweepConfig(probe_bounds=[1.0], model="transformer")
    with pytest.raises(ConfigError, match="--probe-m"):
        SweepConfig(probe_m=0)
    with pytest.raises(ConfigError, match="--s"):
        SweepConfig(s=3, probe_T=2)


def test_cli_probe_and_search_flags_report_bad_values(tmp_path):
    from typer.testing import CliRunner

    from attnlab.variables.cli import app

    runner = CliRunner()
    for args, flag in ((["--probe-bounds", "2,x"], "--probe-bounds"), (["--probe-bounds", "2,-1"], "--probe-bounds"),
                       (["--probe-m", "0"], "--probe-m"), (["--doubling", "0"], "--doubling")):
        res = runner.invoke(app, ["sweep", *args, "--out", str(tmp_path)])
        assert res.exit_code == 2 and flag in res.output, (args, res.output)
