"""The ensembles trained by :mod:`attnlab.variables.ensemble`: the bounded-norm attention head and the MLP contrast.

Each model holds E independent members (each its own seed, task instance and train size m): every parameter
carries a leading member dimension, and each member is initialised from its own generator (:func:`_gen`).

The **bounded-norm class** (the class of Edelman et al.'s log T bound): one self-attention layer read out
through the CLS token, no biases, no LayerNorm, no MLP, no residual, no output projection:

    x_t = E_tok[id_t] + E_pos[t],  p^h = softmax_t(x_0^T W_Q^h^T W_K^h x_t / sqrt(d_head)),
    z^h = sum_t p^h_t W_V^h x_t,   logits = W_c [z^1; ...; z^H].

Every parameter that scales the logits or the output is projected after each optimiser step onto
||E_tok[i]||, ||E_pos[t]|| <= emb_bound, ||W_Q^h^T W_K^h||_F <= qk_bound (per head), ||W_V||_F <= v_bound
and ||W_c||_F <= out_bound. Only the readout row of attention is computed, in O(T d) per example
(the token and position parts of x_t are projected separately, which is exact).

The **contrast** is a one-hidden-layer ReLU MLP on the flattened +/-1 bits trained with SGD + momentum:
a rotation-invariant learner, whose sample complexity on sparse targets grows at least linearly in T
(Ng 2004), against attention's log T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .tasks import CLS_ID, VOCAB_SIZE, SparseBooleanTask


@dataclass
class Member:
    """One model of the ensemble: its task instance, train size and seed."""

    task: SparseBooleanTask
    m: int
    seed: int


def _gen(seed: int, m: int, salt: int) -> torch.Generator:
    """A CPU generator for one member, keyed by (seed, m, salt); init uses m = 0 (same init for every m)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed % 2**63, m, salt]).generate_state(1)[0]))


# ---------------------------------------------------------------- models


class BoundedHeads(torch.nn.Module):
    """E bounded-norm one-layer attention heads with a CLS readout (see module docstring)."""

    attention = "softmax"

    def __init__(self, members: Sequence[Member], d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"--d-model ({d_model}) must be divisible by --n-heads ({n_heads})")
        N = members[0].task.seq_len
        self.H, self.dh, self.d = n_heads, d_model // n_heads, d_model
        shapes = {"tok": (VOCAB_SIZE, d_model), "pos": (N, d_model), "wq": (n_heads, self.dh, d_model),
                  "wk": (n_heads, self.dh, d_model), "wv": (n_heads, self.dh, d_model), "wc": (2, d_model)}
        init: dict[str, list[torch.Tensor]] = {k: [] for k in shapes}
        for mb in members:
            g = _gen(mb.seed, 0, 1)
            for k, shp in shapes.items():
                std = 1.0 / math.sqrt(d_model) if k in ("tok", "pos") else init_std
                init[k].append(torch.randn(shp, generator=g) * std)
        for k, v in init.items():
            setattr(self, k, torch.nn.Parameter(torch.stack(v)))

    @property
    def cfg(self):
        """The probe reads ``model.cfg.attention``."""
        return self

    def readout_attention(self, onehot: torch.Tensor) -> torch.Tensor:
        """Readout-row attention (E, B, H, N) from one-hot tokens (E, B, N, V)."""
        x0 = self.tok[:, CLS_ID] + self.pos[:, 0]  # (E, d)
        q = torch.einsum("ehkd,ed->ehk", self.wq, x0)
        qk = torch.einsum("ehk,ehkd->ehd", q, self.wk) / math.sqrt(self.dh)  # x_0^T W_Q^T W_K / sqrt(dh)
        a_pos = torch.einsum("ehd,end->ehn", qk, self.pos)  # (E, H, N)
        a_tok = torch.einsum("ehd,evd->ehv", qk, self.tok)  # (E, H, V)
        logits = a_pos[:, None] + torch.einsum("ebnv,ehv->ebhn", onehot, a_tok)
        return torch.softmax(logits, dim=-1)

    def forward(self, onehot: torch.Tensor, return_attention: bool = False):
        """Class logits (E, B, 2) (and the readout attention).

        Everything after the attention is linear, so W_c^h W_V^h (2 x d per head) is applied to the token and
        position embeddings first: logits = sum_h sum_t p^h_t W_c^h W_V^h x_t, in O(H N) per example instead of
        O(d N) (the same function as z^h = sum_t p^h_t W_V^h x_t, logits = W_c [z^1; ...; z^H])."""
        p = self.readout_attention(onehot)
        E = self.wc.shape[0]
        U = torch.einsum("echk,ehkd->ehcd", self.wc.view(E, 2, self.H, self.dh), self.wv)  # (E, H, 2, d)
        u_pos = torch.einsum("ehcd,end->ehnc", U, self.pos)  # (E, H, N, 2)
        u_tok = torch.einsum("ehcd,evd->ehvc", U, self.tok)  # (E, H, V, 2)
        out = torch.einsum("ebhn,ehnc->ebc", p, u_pos)
        out = out + torch.einsum("ebhv,ehvc->ebc", torch.einsum("ebhn,ebnv->ebhv", p, onehot), u_tok)
        return (out, p) if return_attention else out

    @staticmethod
    def encode(ids: torch.Tensor) -> torch.Tensor:
        """Token ids (E, B, N) -> float one-hot (E, B, N, V)."""
        return (ids[..., None] == torch.arange(VOCAB_SIZE, device=ids.device, dtype=ids.dtype)).float()

    def qk_norms(self) -> torch.Tensor:
        """||W_Q^h^T W_K^h||_F per member and head, (E, H)."""
        return torch.einsum("ehkd,ehkf->ehdf", self.wq, self.wk).flatten(2).norm(dim=-1)

    @torch.no_grad()
    def norms(self) -> dict[str, torch.Tensor]:
        """Per-member controlled norms: emb (max row), qk (max head), v, out; each (E,)."""
        emb = torch.cat([self.tok, self.pos], dim=1).norm(dim=-1).amax(-1)
        return {"emb": emb, "qk": self.qk_norms().amax(-1), "v": self.wv.flatten(1).norm(dim=-1),
                "out": self.wc.flatten(1).norm(dim=-1)}

    @torch.no_grad()
    def project(self, bounds: "Bounds") -> None:
        """Rescale every controlled weight onto its bound (the projection after each optimiser step)."""
        if bounds.emb is not None:
            for w in (self.tok, self.pos):
                w.mul_((bounds.emb / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
        if bounds.qk is not None:
            s = (bounds.qk / self.qk_norms().clamp_min(1e-12)).clamp(max=1.0).sqrt()[..., None, None]  # (E,H,1,1)
            self.wq.mul_(s)
            self.wk.mul_(s)
        for w, b in ((self.wv, bounds.v), (self.wc, bounds.out)):
            if b is not None:
                w.mul_((b / w.flatten(1).norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0).view(-1, *[1] * (w.dim() - 1)))


class MLPEnsemble(torch.nn.Module):
    """E one-hidden-layer ReLU MLPs on the flattened +/-1 bits (the readout token is dropped)."""

    attention = None

    def __init__(self, members: Sequence[Member], width: int):
        super().__init__()
        T = members[0].task.T
        w1, w2 = [], []
        for mb in members:
            g = _gen(mb.seed, 0, 2)
            w1.append(torch.randn(T, width, generator=g) / math.sqrt(T))
            w2.append(torch.randn(width, 2, generator=g) / math.sqrt(width))
        E = len(members)
        self.w1, self.w2 = torch.nn.Parameter(torch.stack(w1)), torch.nn.Parameter(torch.stack(w2))
        self.b1, self.b2 = torch.nn.Parameter(torch.zeros(E, 1, width)), torch.nn.Parameter(torch.zeros(E, 1, 2))

    @staticmethod
    def encode(ids: torch.Tensor) -> torch.Tensor:
        """Token ids (E, B, T + 1) -> +/-1 floats (E, B, T)."""
        return ids[..., 1:].float() * 2 - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (E, B, 2)."""
        return torch.relu(torch.bmm(x, self.w1) + self.b1).bmm(self.w2) + self.b2

    @torch.no_grad()
    def norms(self) -> dict[str, torch.Tensor]:
        """Frobenius norms of both layers per member."""
        return {"w1": self.w1.flatten(1).norm(dim=-1), "w2": self.w2.flatten(1).norm(dim=-1)}

    def project(self, bounds: "Bounds") -> None:
        """The MLP is not norm-constrained."""


@dataclass
class Bounds:
    """Norm bounds of the bounded class (None = that norm is free)."""

    emb: Optional[float] = 1.0
    qk: Optional[float] = 16.0
    v: Optional[float] = 4.0
    out: Optional[float] = 4.0

    def __post_init__(self) -> None:
        for flag, b in (("--emb-bound", self.emb), ("--qk-bound", self.qk), ("--v-bound", self.v),
                        ("--out-bound", self.out)):
            if b is not None and not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
                raise ConfigError(f"{flag} must be a finite number > 0 (got {b})")
