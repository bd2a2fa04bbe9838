"""Old home of the SmallTransformer adapter; kept as a re-export (see ``attnlab.sources.small``)."""

from __future__ import annotations

from typing import Optional

from ..attention import Handler
from ..models.transformer import SmallTransformer


def own_model_hooks(model: SmallTransformer, handler: Handler, layers: Optional[list[int]] = None):
    """Route the chosen layers of our transformer through ``handler`` (``SmallSource(model).hooks``)."""
    from ..sources.small import SmallSource

    return SmallSource(model).hooks(handler, layers)
