"""attnlab's small transformer: nanoGPT-sized, with pluggable attention (softmax | entmax | a handler).

Used by reconstruction training, Sparsefinder and the variable-creation experiments. Encoder
(bidirectional, masked LM or readout classification) or decoder (causal LM) by ``causal``. Each layer's
attention can be routed through an :data:`attnlab.attention.Handler` (the same seam as HF models; install
it with ``attnlab.sources.small.SmallSource(model).hooks(handler)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, ShapeError
from ..attention import AttentionCall, Handler
from .attention import check_alpha, normaliser, sdpa_softmax


@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`SmallTransformer` (one comment per field)."""

    vocab_size: int  # number of token ids
    d_model: int = 128  # hidden width
    n_heads: int = 4  # attention heads per layer
    n_layers: int = 2  # transformer blocks
    d_ff: int = 0  # MLP width (0 = 4 * d_model)
    max_len: int = 512  # longest sequence (learned positions)
    causal: bool = False  # decoder (causal mask) if True, encoder otherwise
    attention: str = "softmax"  # softmax | entmax | sparsemax
    alpha: float = 1.5  # entmax alpha (> 1); initial value when learn_alpha
    learn_alpha: bool = False  # learn one alpha per head (alpha = 1 + softplus(.))
    dropout: float = 0.0  # dropout on residual branches
    n_classes: int = 0  # > 0 adds a classifier reading token 0 (CLS/readout)
    lm_head: bool = True  # token-level output head (tied to the embedding)
    layer_norm: bool = True  # pre-LN blocks; False gives a plain (norm-free) transformer
    mlp: bool = True  # include the MLP sub-block

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.d_model < 1 or self.n_layers < 1 or self.n_heads < 1:
            raise ConfigError(f"vocab_size, d_model, n_layers, n_heads must be >= 1 (got {self})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.attention not in ("softmax", "entmax", "sparsemax"):
            raise ConfigError(f"--attention must be softmax, entmax or sparsemax (got {self.attention!r})")
        if self.attention == "entmax":
            check_alpha(self.alpha)

    def to_dict(self) -> dict:
        """Plain dict (for JSON metadata)."""
        return asdict(self)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an explicit path (probabilities available) and a fused SDPA path."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.alpha_raw: Optional[nn.Parameter] = None
        self.handler: Optional[Handler] = None  # set by attnlab.sources.small hooks
        if cfg.attention == "entmax" and cfg.learn_alpha:
            init = torch.log(torch.expm1(torch.tensor(cfg.alpha - 1.0)))  # softplus^-1(alpha - 1)
            self.alpha_raw = nn.Parameter(init.repeat(cfg.n_heads))

    def alpha(self) -> float | torch.Tensor:
        """Current entmax alpha (a (1,H,1,1) tensor when learned)."""
        if self.alpha_raw is None:
            return self.cfg.alpha
        return (1.0 + F.softplus(self.alpha_raw)).view(1, -1, 1, 1)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and split into heads: three (B, H, N, d_head) tensors."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).split(self.cfg.d_model, dim=-1)
        return tuple(t.view(B, N, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v))  # type: ignore

    def forward(
        self, x: torch.Tensor, allowed: Optional[torch.Tensor], need_probs: bool, qk_sink: Optional[list],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, N, D = x.shape
        q, k, v = self.split(x)  # (B, H, N, dh)
        if qk_sink is not None:
            qk_sink.append((q.detach(), k.detach()))
        probs, out = None, None
        if self.handler is not None:  # a handler's None means: the explicit built-in attention
            out = self.handler(AttentionCall(self.layer, q, k, v, allowed, None, self.d_head**-0.5))
        if out is None and self.handler is None and self.cfg.attention == "softmax" and not need_probs:
            out = sdpa_softmax(q, k, v, allowed)
        elif out is None:
            scores = (q @ k.transpose(-1, -2)) * self.d_head**-0.5  # (B, H, N, N)
            probs = normaliser(self.cfg.attention, self.alpha())(scores, allowed)
            out = probs @ v
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj(out), probs


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.layer_norm else nn.Identity
        self.ln1, self.ln2 = norm(), norm()
        self.attn = SelfAttention(cfg, layer)
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, d_ff), nn.GELU(), nn.Linear(d_ff, cfg.d_model)) if cfg.mlp else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, allowed, need_probs, qk_sink):
        a, probs = self.attn(self.ln1(x), allowed, need_probs, qk_sink)
        x = x + self.drop(a)
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.ln2(x)))
        return x, probs


@dataclass
class TransformerOutput:
    """Outputs of :class:`SmallTransformer`."""

    hidden: torch.Tensor  # (B, N, D) final hidden states
    logits: Optional[torch.Tensor] = None  # (B, N, V) token logits (lm_head)
    class_logits: Optional[torch.Tensor] = None  # (B, C) from token 0 (n_classes > 0)
    attentions: list = field(default_factory=list)  # per layer (B, H, N, N) probabilities, if asked
    qk: list = field(default_factory=list)  # per layer (q, k), each (B, H, N, dh), if asked


class SmallTransformer(nn.Module):
    """A small transformer whose attention is softmax or entmax, or per layer whatever a handler returns."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.n_classes) if cfg.n_classes > 0 else None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def allowed_mask(self, attention_mask: Optional[torch.Tensor], N: int, device) -> Optional[torch.Tensor]:
        """Boolean (B or 1, 1, N, N) mask from key padding (B, N) and causality; None if all allowed."""
        allowed = None
        if self.cfg.causal:
            allowed = torch.ones(N, N, dtype=torch.bool, device=device).tril().view(1, 1, N, N)
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
            allowed = keys if allowed is None else (allowed & keys)
        return allowed

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
        return_attention: bool = False, return_qk: bool = False,
    ) -> TransformerOutput:
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, N = input_ids.shape
        if N > self.cfg.max_len:
            raise ConfigError(f"sequence length {N} exceeds the model's max_len {self.cfg.max_len}")
        pos = torch.arange(N, device=input_ids.device)
        x = self.drop(self.tok(input_ids) + self.pos(pos))
        allowed = self.allowed_mask(attention_mask, N, input_ids.device)
        out = TransformerOutput(hidden=x)
        qk_sink = out.qk if return_qk else None
        for i, block in enumerate(self.blocks):
            x, probs = block(x, allowed, return_attention, qk_sink)
            if return_attention:
                out.attentions.append(probs)
        x = self.ln_f(x)
        out.hidden = x
        if self.cfg.lm_head:
            out.logits = x @ self.tok.weight.T  # (B, N, V), tied embedding
        if self.classifier is not None:
            out.class_logits = self.classifier(x[:, 0])
        return out
