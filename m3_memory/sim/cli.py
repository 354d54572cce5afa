"""`demo-scene` sub-command: generate the tabletop scene directory, rosbag2 bag and previews.

pybullet is only imported when the command runs, so registering it costs the `m3` command nothing.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def scene_size(text: str) -> str:
    """argparse type of `--size`: one of the generator's sizes (a wrong one is a usage error, exit code 2)."""
    from m3_memory.sim import SIZES

    if text not in SIZES:
        raise argparse.ArgumentTypeError(f"unknown scene size {text!r}; choose one of {sorted(SIZES)}")
    return text


def object_move(text: str) -> tuple[str, tuple[float, float]]:
    """argparse type of `--move`: `NAME:DX,DY` (metres on the table top, world frame) → `(NAME, (DX, DY))`."""
    name, _, offset = text.rpartition(":")
    try:
        dx, dy = (float(part) for part in offset.split(","))
        valid = bool(name.strip()) and math.isfinite(dx) and math.isfinite(dy)
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:DX,DY (metres), e.g. 'yellow bath duck:0.25,0'")
    return name.strip(), (dx, dy)


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
    parser.add_argument("--move", type=object_move, action="append", default=[], metavar="NAME:DX,DY",
                        help="displace this object by (DX, DY) metres on the table (repeatable): the same table and "
                             "camera walk as without, a second scan of a changed place")


def run(args: argparse.Namespace) -> int:
    from m3_memory.sim.demo import demo_scene

    moves = dict(args.move)
    if len(moves) != len(args.move):
        raise ValueError("--move names the same object twice; give each object one offset")
    path = demo_scene(size=args.size, seed=args.seed, out=args.out, progress=lambda line: print(line, flush=True),
                      moves=moves)
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
