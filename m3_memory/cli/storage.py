"""`m3 scans` and `m3 memories`: what a machine's storage root holds (m3_memory.core.storage), per robot, oldest
first; one JSON object a line."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path


def _entries(args, kind: str) -> list[dict]:
    from m3_memory.core.storage import Storage, held_manifest, robot_name

    storage = Storage(args.root)
    robots = [robot_name(args.robot)] if args.robot else storage.robots()
    entries = []
    for robot in robots:
        items = storage.scans(robot) if kind == "scans" else storage.memories(robot)
        for path in items:
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            entry = {"robot": robot, "id": path.name if path.is_dir() else path.stem, "path": str(path),
                     "bytes": sum(p.stat().st_size for p in files),
                     "modified": datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(
                         timespec="seconds")}
            if kind == "scans":
                entry["frames"] = _frames(path)
                entry["held"] = held_manifest(path) is not None   # pulled completely from its recorder
            entries.append(entry)
    return entries


def _frames(scan: Path) -> int:
    index = scan / "frames.jsonl"
    return sum(1 for line in index.read_bytes().split(b"\n") if line.strip()) if index.is_file() else 0


def _list(kind: str):
    def run(args) -> int:
        for entry in _entries(args, kind):
            print(json.dumps(entry))
        return 0
    return run


def register(verbs) -> None:
    for kind, text in (("scans", "list the scans a storage root holds (recorder or worker)"),
                       ("memories", "list the memories a storage root holds")):
        parser = verbs.add_parser(kind, help=text)
        parser.add_argument("--root", type=Path, default=Path("storage"),
                            help="the machine's storage root (the nodes' storage_root; default ./storage)")
        parser.add_argument("--robot", default="", help="only this robot (namespace, e.g. robot1)")
        parser.set_defaults(func=_list(kind))
