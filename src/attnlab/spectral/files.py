"""File names of a spectrum run directory (readers import them from here, not from the run module)."""

#: per-head statistics and bases of a spectrum run
TENSORS = "spectrum.safetensors"
