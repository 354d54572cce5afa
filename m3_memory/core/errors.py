"""Errors m3_memory.core raises for bad input; each message says what to fix."""


class M3Error(Exception):
    """Base class of every error m3_memory raises on purpose."""


class QueryError(M3Error, ValueError):
    """A text query that cannot be answered as given (empty, oversized)."""
