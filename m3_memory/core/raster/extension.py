"""Build and load the C++ (multi-threaded) CPU rasterizer (the build command itself is `m3_memory.cli.build_raster`).

Build once, explicitly (at setup, never in the middle of a training run)::

    python -m m3_memory.cli.build_raster

The shared library goes under ``sys.prefix`` (the virtual environment) next to a stamp holding the digest of the
sources and flags, so a stale build is detected at load time instead of being silently rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXT_NAME = "m3_raster_cpu"
BUILD_COMMAND = "python -m m3_memory.cli.build_raster"
SOURCES = (Path(__file__).parent / "csrc" / "raster_cpu.cpp",)
# -march=native: the library is built on the machine that runs it (setup step), and AVX helps the vector loops.
# -ffp-contract=off: vectorised and scalar code round alike, so forward and backward screen pixels identically.
# -fopenmp: at::parallel_for's OpenMP backend is a header template, so it runs in parallel only when this file is
# compiled with OpenMP; no -lgomp at link time, so GOMP_* resolve to torch's own bundled runtime and thread pool
# (without the flag the tile loop silently ran on one thread). It also enables the `omp simd` channel reductions.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")  # C++ standard: torch's own flag
LDFLAGS = ()

STAMP = "SOURCE_DIGEST"


def build_dir() -> Path:
    """Directory of the built library inside the current Python prefix (the venv)."""
    return Path(sys.prefix) / "share" / "m3_memory" / EXT_NAME


def source_digest() -> str:
    """SHA-256 over the sources, compiler flags and torch version: changes whenever a rebuild is needed."""
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for path in SOURCES:
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    return digest.hexdigest()


def build(directory: Path | None = None, verbose: bool = False) -> Path:
    """Compile the extension with torch's cpp_extension (needs g++ and ninja) into `directory` (default
    `build_dir()`); returns the library path."""
    from torch.utils.cpp_extension import load

    directory = Path(directory or build_dir())
    directory.mkdir(parents=True, exist_ok=True)
    load(
        name=EXT_NAME,
        sources=[str(p) for p in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        verbose=verbose,
    )
    (directory / STAMP).write_text(source_digest())
    return directory / f"{EXT_NAME}.so"


@functools.lru_cache(maxsize=None)
def load_extension(directory: Path | None = None) -> ModuleType:
    """Import the extension built in `directory` (default `build_dir()`); raises RuntimeError naming the build
    command when it is missing or stale. Never compiles."""
    directory = Path(directory or build_dir())
    lib, stamp = directory / f"{EXT_NAME}.so", directory / STAMP
    if not lib.exists():
        raise RuntimeError(f"CPU rasterizer not built (no {lib}); build it with: {BUILD_COMMAND}")
    if not stamp.exists() or stamp.read_text().strip() != source_digest():
        raise RuntimeError(f"CPU rasterizer build at {lib} is stale (sources changed); rebuild it with: {BUILD_COMMAND}")
    import torch  # noqa: F401  (the library links against torch's shared objects, which must be loaded first)

    spec = importlib.util.spec_from_file_location(EXT_NAME, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

