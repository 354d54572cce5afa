"""`demo-scene` sub-command: generate the tabletop scene directory, rosbag2 bag and previews.

pybullet is only imported when the command runs, so registering it costs the `m3` command nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="new output directory (default: the cache, $M3_CACHE_DIR or ~/.cache/m3_memory)",
    )
    parser.add_argument("--size", default="demo", help="tiny (unit tests, ~1 s) or demo (~50 keyframes, ~25 s)")
    parser.add_argument("--seed", type=int, default=0, help="object layout, timing jitter and dropped frames")


def run(args: argparse.Namespace) -> int:
    from m3_memory.sim.demo import demo_scene

    path = demo_scene(size=args.size, seed=args.seed, out=args.out, progress=lambda line: print(line, flush=True))
    print(f"scene: {path}\nbag: {path / 'bag'}\npreviews: {path / 'previews'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `demo-scene` to an `m3` sub-command parser; the parsed namespace's `func(args)` runs it."""
    parser = subparsers.add_parser(
        "demo-scene", help="generate the synthetic tabletop scene (scene dir + rosbag2)", description=__doc__
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m m3_memory.sim --out DIR [--size tiny|demo] [--seed N]`."""
    parser = argparse.ArgumentParser(prog="python -m m3_memory.sim", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
