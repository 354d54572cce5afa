"""Build and load the C++ (multi-threaded) CPU rasterizer (the build command itself is `m3_memory.cli.build_raster`).

The first use compiles it (a minute or two, needs g++ and ninja) when no current build exists; prebuild it with::

    python -m m3_memory.cli.build_raster

A build is a directory holding the shared library next to a stamp with the digest of the sources and flags. It goes
into the install's `share/m3_memory/m3_raster_cpu` (the venv, a colcon workspace) when that is writable, else into the
user cache (`$M3_CACHE_DIR` / `$XDG_CACHE_HOME/m3_memory` / `~/.cache/m3_memory`, under `torch_extensions/`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

from m3_memory.core.resources import PACKAGE, cache_dir, installed_share_dir, package_file

EXT_NAME = "m3_raster_cpu"
BUILD_COMMAND = "python -m m3_memory.cli.build_raster"
SOURCES = (package_file("core/raster/csrc/raster_cpu.cpp"),)
# -march=native: the library is built on the machine that runs it (setup or first use), and AVX helps the vector
# loops.
# -ffp-contract=off: vectorised and scalar code round alike, so forward and backward screen pixels identically.
# -fopenmp: at::parallel_for's OpenMP backend is a header template, so it runs in parallel only when this file is
# compiled with OpenMP; no -lgomp at link time, so GOMP_* resolve to torch's own bundled runtime and thread pool
# (without the flag the tile loop silently ran on one thread). It also enables the `omp simd` channel reductions.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")  # C++ standard: torch's own flag
LDFLAGS = ()

STAMP = "SOURCE_DIGEST"


def build_dirs() -> list[Path]:
    """Where a build is looked for, in order: the install's share directory, the interpreter prefix's (a colcon
    workspace on top of the project venv uses the venv's build), the user cache."""
    share = installed_share_dir()
    candidates = [] if share is None else [share / EXT_NAME]
    candidates += [Path(sys.prefix) / "share" / PACKAGE / EXT_NAME, cache_dir() / "torch_extensions" / EXT_NAME]
    return list(dict.fromkeys(candidates))


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def build_dir() -> Path:
    """Where a new build goes: the first writable of `build_dirs()` (the user cache when the install is read-only)."""
    candidates = build_dirs()
    return next((directory for directory in candidates if _writable(directory)), candidates[-1])


def source_digest() -> str:
    """SHA-256 over the sources, compiler flags and torch version: changes whenever a rebuild is needed."""
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for path in SOURCES:
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    return digest.hexdigest()


def _compile(directory: Path, verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    module = load(name=EXT_NAME, sources=[str(p) for p in SOURCES], extra_cflags=list(CFLAGS),
                  extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=verbose)
    (directory / STAMP).write_text(source_digest())
    return module


def build(directory: Path | None = None, verbose: bool = False) -> Path:
    """Compile the extension with torch's cpp_extension (needs g++ and ninja) into `directory` (default
    `build_dir()`); returns the library path."""
    directory = Path(directory or build_dir())
    _compile(directory, verbose)
    return directory / f"{EXT_NAME}.so"


def _current(directory: Path, digest: str) -> bool:
    stamp = directory / STAMP
    return (directory / f"{EXT_NAME}.so").is_file() and stamp.is_file() and stamp.read_text().strip() == digest


def _import(directory: Path) -> ModuleType:
    import torch  # noqa: F401  (the library links against torch's shared objects, which must be loaded first)

    spec = importlib.util.spec_from_file_location(EXT_NAME, directory / f"{EXT_NAME}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def load_extension(directory: Path | None = None) -> ModuleType:
    """The extension: the current build in `build_dirs()`, else compiled now into `build_dir()` (first use).

    With `directory` given, only the build there, never compiled: RuntimeError naming the build command when it is
    missing or stale."""
    digest = source_digest()
    if directory is not None:
        directory, lib = Path(directory), Path(directory) / f"{EXT_NAME}.so"
        if not lib.exists():
            raise RuntimeError(f"CPU rasterizer not built (no {lib}); build it with: {BUILD_COMMAND}")
        if not _current(directory, digest):
            raise RuntimeError(f"CPU rasterizer build at {lib} is stale (sources changed); rebuild it with: "
                               f"{BUILD_COMMAND}")
        return _import(directory)
    for candidate in build_dirs():
        if _current(candidate, digest):
            return _import(candidate)
    target = build_dir()
    warnings.warn(f"compiling the CPU rasterizer into {target} (first use, a minute or two; prebuild it with: "
                  f"{BUILD_COMMAND})", stacklevel=2)
    return _compile(target, verbose=False)
