"""Files m3-memory ships, found where the running install put them, and the per-user cache directory.

Two kinds of shipped files:
- package data, inside the Python package (the bundled m3-tinyvlm weights, the rasterizer's C++ source): read through
  `importlib.resources`, so every install that imports `m3_memory` has them (`package_file`);
- share files, beside it in `<prefix>/share/m3_memory/` as ROS 2 packages keep them (`config/*.yaml`, `launch/`,
  `package.xml`): `share_file` looks in, in order,
  1. the prefix the imported package is installed in (`<prefix>/lib/pythonX.Y/site-packages/m3_memory` ->
     `<prefix>/share/m3_memory`): a wheel in a venv or `--user`, a `colcon build` without `--symlink-install`, a deb;
  2. the ament index (`$AMENT_PREFIX_PATH`, as `ament_index_python` reads it; core imports no ROS package): a colcon
     workspace with `--symlink-install`, or the project venv, whose `share/m3_memory` links to the checkout;
  3. the source checkout the package is imported from (`PYTHONPATH=<repo>`): its root has the share layout.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

PACKAGE = "m3_memory"


def package_file(relative: str) -> Path:
    """The file `relative` (e.g. "core/raster/csrc/raster_cpu.cpp") of the m3_memory package, wherever it is
    imported from (installed unzipped: setup.py sets zip_safe=False)."""
    return Path(str(importlib.resources.files(PACKAGE).joinpath(relative)))


def installed_share_dir() -> Path | None:
    """`<prefix>/share/m3_memory` of the install the running package belongs to (1. and 2. in the module docstring),
    or None for a bare source checkout."""
    site, version, lib, prefix = (list(package_file("").parents) + [Path()] * 4)[:4]
    installed = site.name in ("site-packages", "dist-packages") and version.name.startswith("python")
    if installed and lib.name in ("lib", "lib64") and (prefix / "share" / PACKAGE).is_dir():
        return prefix / "share" / PACKAGE
    for ament_prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if ament_prefix and (Path(ament_prefix) / "share/ament_index/resource_index/packages" / PACKAGE).is_file():
            return Path(ament_prefix) / "share" / PACKAGE
    return None


def share_dirs() -> list[Path]:
    """The directories `share_file` searches, in order (module docstring)."""
    candidates = [installed_share_dir()]
    checkout = package_file("").parent
    if (checkout / "package.xml").is_file() and (checkout / "setup.py").is_file():
        candidates.append(checkout)
    return list(dict.fromkeys(path for path in candidates if path is not None))


def share_file(relative: str) -> Path:
    """The shipped file `relative` (e.g. "config/train.yaml") of the first of `share_dirs()` that has it; when none
    has it, where the first would hold it (so a "not found" message names the install's own location)."""
    candidates = share_dirs()
    for directory in candidates:
        if (directory / relative).exists():
            return directory / relative
    return (candidates[0] if candidates else Path(f"<prefix>/share/{PACKAGE}")) / relative


def cache_dir() -> Path:
    """Per-user cache root (generated scenes, the rasterizer built on first use): `$M3_CACHE_DIR`, else
    `$XDG_CACHE_HOME/m3_memory`, else `~/.cache/m3_memory`."""
    if os.environ.get("M3_CACHE_DIR"):
        return Path(os.environ["M3_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / PACKAGE
