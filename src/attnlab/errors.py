"""Error types: every user-facing failure is an ``AttnlabError`` naming the problem and the fix."""

from __future__ import annotations


class AttnlabError(Exception):
    """Base class of every error attnlab raises on purpose."""


class ConfigError(AttnlabError, ValueError):
    """A parameter or flag has a bad value (the message names the flag)."""


class CorpusError(AttnlabError, ValueError):
    """The corpus is missing, empty, binary or too short."""


class ModelError(AttnlabError, ValueError):
    """The model cannot be loaded or its attention layers are not recognised."""


class NumericalError(AttnlabError, ArithmeticError):
    """NaN or inf appeared in scores or statistics."""


class ResultsError(AttnlabError, OSError):
    """A run directory or results file is missing, corrupt or from an incompatible run."""


class ShapeError(AttnlabError, ValueError):
    """Tensors or artefacts have mismatched shapes (e.g. a basis from another sequence length)."""
