"""Confining caller-given paths to configured roots (a node's scan and memory folders)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from m3_memory.core.errors import M3Error


def confine(path: str | Path, roots: Sequence[str | Path], what: str = "path") -> Path:
    """`path` resolved (symlinks and `..` included, relative paths from the working directory) when it lies under one
    of `roots` (themselves resolved), else M3Error naming the roots. The root itself counts as under it."""
    if not roots:
        raise M3Error(f"{what} {path} cannot be used: no roots are configured")
    resolved = Path(path).expanduser().resolve(strict=False)
    allowed = [Path(root).expanduser().resolve(strict=False) for root in roots]
    if any(resolved.is_relative_to(root) for root in allowed):
        return resolved
    raise M3Error(f"{what} {path} (resolves to {resolved}) is outside the configured roots "
                  f"[{', '.join(map(str, allowed))}]")
