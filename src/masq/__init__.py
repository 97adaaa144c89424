"""masq: importance-weighted consolidation (EWC with the diagonal Fisher or MaSQ).

Public modules: :mod:`masq.data`, :mod:`masq.tasks`, :mod:`masq.importance`,
:mod:`masq.models`, :mod:`masq.ewc`, :mod:`masq.train`, :mod:`masq.experiment`,
:mod:`masq.search`, :mod:`masq.stacked`, :mod:`masq.results`, :mod:`masq.report`.
Import them as ``from masq import importance, ewc``; this package file stays free of
torch so that the CLI can set up threading before torch loads.
"""

from masq.errors import ConfigError, DataError, MasqError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "MasqError", "__version__"]
