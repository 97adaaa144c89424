"""masq: importance-weighted consolidation (EWC with the diagonal Fisher or MaSQ).

Rooms, in the direction of imports (each imports only those before it):
:mod:`masq.config` (choices and the field registry), :mod:`masq.data`, :mod:`masq.slt`,
:mod:`masq.tasks`, :mod:`masq.models`, :mod:`masq.importance`, :mod:`masq.consolidation`,
:mod:`masq.training`, :mod:`masq.stacked`, :mod:`masq.protocol`, :mod:`masq.runid`,
:mod:`masq.store`, :mod:`masq.grid`, :mod:`masq.report`, and :mod:`masq.cli` on top. Import
them as ``from masq import importance, protocol``; this package file stays free of torch so
that the CLI can set up threading before torch loads.
"""

from masq.errors import ConfigError, DataError, MasqError

__version__ = "0.2.0"

__all__ = ["ConfigError", "DataError", "MasqError", "__version__"]
