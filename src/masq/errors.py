"""User-facing errors.

Every error a user can cause (bad input, missing data, a corrupted file) is a
:class:`MasqError`. Its message is one line that names the problem and the fix;
the CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class MasqError(Exception):
    """Base class of the errors caused by input or environment, not by a bug."""


class ConfigError(MasqError, ValueError):
    """A configuration value is out of range or malformed."""


class DataError(MasqError):
    """A dataset could not be found, fetched or verified."""


class ChecksumError(DataError):
    """A file's checksum does not match the published one."""
