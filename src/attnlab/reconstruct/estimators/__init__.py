"""Estimators of the unobserved scores of a row from its observed ones, per (layer, head): one file each, one
registry (:data:`ESTIMATOR_REGISTRY`, protocol in :mod:`.base`). Each registered object carries its name, help,
tags, its compute cost per row and how it is built from a fit, so a new estimator is one file plus one
registration.

- ``gaussian`` (:mod:`.gaussian`): conditional Gaussian with a diffuse (or known) offset.
- ``basis`` (:mod:`.basis`): ridge least squares in the top-k eigenbasis.
- ``none`` (:mod:`.none`): no estimate; unobserved keys get -inf (sparse attention on the selected pairs).
- ``mean`` (:mod:`.mean`): the prior mean shifted to the row.
- ``proxy`` (:mod:`.proxy`): the low-rank proxy shifted to the row's mean (no fitted statistics).
- ``proxy+gaussian`` (:mod:`.proxy_gaussian`): proxy plus the conditional-Gaussian estimate of its residual.

A new built-in estimator is one file here whose :class:`EstimatorKind` calls :func:`register_estimator`, plus its
import line below (registration order is the order of ``--all`` and of the results); from outside the package,
``register_estimator`` alone (see tests/test_estimator_registry.py).
"""

from __future__ import annotations

from .base import (
    ESTIMATOR_REGISTRY,
    TAGS,
    EstimatorKind,
    HeadEstimator,
    NameView,
    estimator_kind,
    make_estimator,
    register_estimator,
)
from .row import ESTIMATORS, Estimator, RowModel, RowModelKind, expand_idx
from .gaussian import GaussianEstimator, reference_gaussian  # importing registers, in this order
from .basis import BasisEstimator, check_k
from .none import NoneEstimator
from .mean import MeanEstimator
from .proxy import ProxyFill
from .proxy_gaussian import ResidualEstimator

PROXY_ESTIMATORS = NameView("proxy")  # estimators that also read the proxy scores of every pair
ALL_ESTIMATORS = NameView()  # every name --estimators accepts

__all__ = [
    "ALL_ESTIMATORS", "ESTIMATORS", "ESTIMATOR_REGISTRY", "PROXY_ESTIMATORS", "TAGS", "BasisEstimator", "Estimator",
    "EstimatorKind", "GaussianEstimator", "HeadEstimator", "MeanEstimator", "NameView", "NoneEstimator", "ProxyFill",
    "ResidualEstimator", "RowModel", "RowModelKind", "check_k", "estimator_kind", "expand_idx", "make_estimator",
    "reference_gaussian", "register_estimator",
]
