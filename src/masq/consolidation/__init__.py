"""Consolidation of earlier tasks: :mod:`masq.consolidation.ewc` (anchors, the EWC penalty,
online EWC's running importance)."""

from masq.consolidation.ewc import Anchor, anchor, online_importance, penalty

__all__ = ["Anchor", "anchor", "online_importance", "penalty"]
