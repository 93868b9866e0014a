"""The base of every error a user can fix: a bad config, data line, model pair or cache.

The command line prints such an error's message alone and exits with status 2; anything else is a bug and keeps
its traceback. Subclasses live beside the code that raises them (ConfigError, DataError, ModelError, CacheError).
"""

from __future__ import annotations


class EgadError(ValueError):
    """An input problem the user can fix; the message names the bad input and the fix."""


__all__ = ["EgadError"]
