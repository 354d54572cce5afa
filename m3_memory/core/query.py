"""Text queries against a memory."""
from __future__ import annotations

from m3_memory.core.errors import QueryError

# CLIP's text encoder reads 77 tokens; a phrase far past this many characters is a mistake, not a query.
DEFAULT_MAX_QUERY_CHARS = 256


def validate_query(text: str, max_chars: int = DEFAULT_MAX_QUERY_CHARS) -> str:
    """Return the query stripped of surrounding white space, or raise QueryError saying what is wrong with it."""
    if not isinstance(text, str):
        raise QueryError(f"query must be text, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise QueryError("query is empty: name the object, e.g. 'yellow bath duck'")
    if len(stripped) > max_chars:
        raise QueryError(f"query is {len(stripped)} characters long; the limit is {max_chars}: use a short phrase")
    if any(ord(c) < 32 and c not in "\t" for c in stripped):
        raise QueryError("query contains control characters (new lines or NUL): send one line of text")
    return stripped
