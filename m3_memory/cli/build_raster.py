"""Build command of the CPU rasterizer: ``python -m m3_memory.cli.build_raster [-v]``."""

import sys

from m3_memory.core.raster.extension import build

if __name__ == "__main__":
    print(f"built {build(verbose='-v' in sys.argv)}")
