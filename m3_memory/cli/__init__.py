"""The `m3` command: one sub-command per job, each registered by the module that owns it.

Every verb runs through `common.run_verb`: a user's mistake is one line on stderr and exit code 1, a wrong command line
exit code 2 (argparse), Ctrl-C 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add sub-commands through `register(subparsers)`; each imports its heavy dependencies only when run.
VERB_MODULES = (
    "m3_memory.sim.cli",
    "m3_memory.cli.features",
    "m3_memory.cli.train",
    "m3_memory.cli.update",
    "m3_memory.cli.query",
    "m3_memory.cli.view",
    "m3_memory.cli.export",
    "m3_memory.cli.colmap",
    "m3_memory.cli.eval",
    "m3_memory.cli.storage",
    "m3_memory.cli.locate",
    "m3_memory.cli.train_remote",
    "m3_memory.ros.bag_play",
    "m3_memory.ros.demo",
)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(
        prog="m3", description="m3-memory: 3D spatial multimodal memory for robots",
        epilog="train trains in this process; train-remote has the running trainer node (ros2 launch m3_bringup "
               "scan_and_grasp.launch.py) train a scan it recorded. `m3 VERB --help` for each verb's options.")
    try:
        parser.add_argument("--version", action="version", version=f"m3-memory {version('m3_memory')}")
    except PackageNotFoundError:   # run from a source tree that was never installed
        parser.add_argument("--version", action="version", version="m3-memory (not installed)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).register(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from m3_memory.cli.common import run_verb

    args = build_parser().parse_args(argv)
    return run_verb(args.verb, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
