"""What every verb shares: how a user's mistake becomes a message and an exit code."""
from __future__ import annotations

import sys
from collections.abc import Callable

# Exit codes of every verb: 0 done; 1 the job failed (a missing or bad file, an unknown setting, nothing found, a
# goal aborted); 2 the command line was wrong (what argparse checks: options, arguments, choices, KEY=VALUE form);
# 130 stopped by Ctrl-C.
FAILED, USAGE, INTERRUPTED = 1, 2, 130


def run_verb(verb: str, body: Callable[..., int], args) -> int:
    """`body(args)`'s exit code, or FAILED with `m3 VERB: why` on stderr when it fails on the user's input or files
    (never a traceback for those), INTERRUPTED on Ctrl-C."""
    from m3_memory.core.errors import M3Error

    try:
        return body(args)
    except (M3Error, ValueError, OSError) as exc:
        print(f"m3 {verb}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(f"m3 {verb}: interrupted", file=sys.stderr)
        return INTERRUPTED


def setting(text: str) -> str:
    """argparse type of a `--set` item: KEY=VALUE, so that a positional argument after `--set` is not taken for one."""
    import argparse

    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (positional arguments go before --set)")
    return text


def add_settings(parser, help_text: str) -> None:
    """The `--set KEY=VALUE ...` option every verb that takes settings has."""
    parser.add_argument("--set", nargs="+", action="extend", type=setting, default=[], metavar="KEY=VALUE",
                        help=help_text)


def progress_bar(description: str):
    """A `(done, total)` progress callback drawing a tqdm bar on stderr (the core reports, the CLI draws)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="view")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
