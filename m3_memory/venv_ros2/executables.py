"""Where a package's executables and launch files live: ament prefixes first, then the venv's bin/."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def ament_prefixes() -> list[Path]:
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    return prefixes or [Path(sys.prefix)]


def find(package: str, executable: str) -> str:
    """Path of `executable` of `package`: `<prefix>/lib/<package>/<executable>` (colcon layout), else the venv's bin/."""
    for prefix in ament_prefixes():
        candidate = prefix / "lib" / package / executable
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for candidate in (Path(sys.prefix) / "bin" / executable, shutil.which(executable)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError(f"no executable {executable!r} for package {package!r} "
                            f"(searched lib/{package}/ under AMENT_PREFIX_PATH and {Path(sys.prefix) / 'bin'})")


def share_directory(package: str) -> Path:
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        return Path(get_package_share_directory(package))
    except PackageNotFoundError:
        raise FileNotFoundError(f"package {package!r} not found under AMENT_PREFIX_PATH="
                                f"{os.environ.get('AMENT_PREFIX_PATH', '')!r} (run `make setup`?)") from None
