"""masq: importance-weighted consolidation (EWC with the diagonal Fisher or MaSQ, IMM).

Public modules: :mod:`masq.data`, :mod:`masq.tasks`, :mod:`masq.importance`,
:mod:`masq.models`, :mod:`masq.ewc`, :mod:`masq.imm`, :mod:`masq.train`,
:mod:`masq.experiment`, :mod:`masq.search`, :mod:`masq.results`, :mod:`masq.report`.
"""

from masq.errors import ConfigError, DataError, MasqError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "MasqError", "__version__"]
