"""Fast prediction paths of the block predictors (fused, launch-free versions of the reference code in
``attnlab.blocksparse.predictors``; each is checked against its reference in the tests).

* :mod:`.vertical_slash`: MInference's vertical-slash pattern from the last queries, grouped-query aware,
  with the run-time recall check on held-out rows in the same pass, captured in one CUDA graph per shape;
  its column/diagonal/check-row sums come from :mod:`.vertical_slash_triton` on CUDA (two fused launches).
* :mod:`.entmax_triton`: the fused block-sparse entmax forward.
"""

from .vertical_slash import VerticalSlashPlan, vertical_slash_fast

__all__ = ["VerticalSlashPlan", "vertical_slash_fast"]
