"""The one exception type for bad data input, so that callers can tell it from bugs."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input to the data pipeline: a missing path, a corrupt file, a bad parameter.

    The message always names the file, URL or parameter at fault, because a user facing a
    100k-image folder needs to know which one to fix.
    """
