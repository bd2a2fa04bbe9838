"""Whether a Triton kernel can run for a tensor here: on CUDA, or in Triton's interpreter (``TRITON_INTERPRET=1``),
with the ``triton`` package importable. Shared by every backend choice that offers a Triton path."""

from __future__ import annotations

import os

import torch


def triton_can_run(device: torch.device) -> bool:
    """True on CUDA (or with TRITON_INTERPRET=1 on any device) when ``triton`` imports."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
