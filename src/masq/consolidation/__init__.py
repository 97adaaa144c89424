"""Consolidation of earlier tasks: the penalty kernel (:mod:`~masq.consolidation.penalty`),
the registry of methods (:mod:`~masq.consolidation.registry`) and the methods, each one module
that registers itself: EWC and online EWC (:mod:`~masq.consolidation.ewc`), mean- and
mode-IMM (:mod:`~masq.consolidation.imm`)."""

from masq.consolidation import (
    ewc,
    imm,  # registers mean-imm, mode-imm
    joint,
    structured,
)
from masq.consolidation.ewc import (
    Anchor,
    FactorAnchor,
    anchor,
    factor_anchor,
    online_importance,
    penalty,
)
from masq.consolidation.penalty import (
    PENALTY_KINDS,
    Penalty,
    QuadraticPenalty,
    merged_anchor,
    penalty_for,
    register_penalty_kind,
)
from masq.consolidation.registry import (
    METHOD_FIELDS,
    METHODS,
    EndResult,
    Method,
    PhaseContext,
    PhasePlan,
    canonical,
    check_config,
    get_method,
    method_label,
    method_names,
    register_method,
)

__all__ = [
    "METHODS",
    "METHOD_FIELDS",
    "PENALTY_KINDS",
    "Anchor",
    "EndResult",
    "FactorAnchor",
    "Method",
    "Penalty",
    "PhaseContext",
    "PhasePlan",
    "QuadraticPenalty",
    "anchor",
    "canonical",
    "check_config",
    "ewc",
    "factor_anchor",
    "get_method",
    "imm",
    "joint",
    "merged_anchor",
    "method_label",
    "method_names",
    "online_importance",
    "penalty",
    "penalty_for",
    "register_method",
    "register_penalty_kind",
    "structured",
]
