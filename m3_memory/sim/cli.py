"""`demo-scene` sub-command: generate the tabletop scene directory, rosbag2 bag and previews.

pybullet is only imported when the command runs, so registering it costs the `m3` command nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def scene_size(text: str) -> str:
    """argparse type of `--size`: one of the generator's sizes (a wrong one is a usage error, exit code 2)."""
    from m3_memory.sim import SIZES

    if text not in SIZES:
        raise argparse.ArgumentTypeError(f"unknown scene size {text!r}; choose one of {sorted(SIZES)}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="new output directory (default: the cache, $M3_CACHE_DIR or ~/.cache/m3_memory)",
    )
    parser.add_argument("--size", default="demo", type=scene_size,
                        help="tiny (unit tests, ~1 s), demo (~50 keyframes, ~25 s) or unseen (a layout no default "
                             "was tuned on)")
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
    from m3_memory.cli.common import run_verb

    parser = argparse.ArgumentParser(prog="python -m m3_memory.sim", description=__doc__)
    add_arguments(parser)
    return run_verb("demo-scene", run, parser.parse_args(argv))
