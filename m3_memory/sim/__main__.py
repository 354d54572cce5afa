import sys

from m3_memory.sim.cli import main

sys.exit(main())
