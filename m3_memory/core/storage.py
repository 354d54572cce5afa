"""Storage on each machine and the pull that moves scans and memories between machines (no ROS here).

One root per machine; everything is named by robot (its ROS namespace without the leading slash, `default` for the
root namespace) and id::

    ROOT/<robot>/scans/<scan_id>/        a scene directory (m3_memory.core.scene), e.g. scan_20260101_120000_000000
    ROOT/<robot>/scans/<scan_id>/.m3_manifest.json   on a receiving machine: the verified manifest (the scan is held)
    ROOT/<robot>/memories/<id>.pt        a memory (m3_memory.core.checkpoint); <id> is the scan id it was trained from
    ROOT/queue.json                      the trainer's persisted job queue (m3_memory.core.jobs)

A manifest lists an item's files with sizes and sha256. A pull (`pull_item`) asks the owner for the manifest and for
chunks of each file (through the two callables it is given: the ROS services in m3_memory.ros.transfer, or anything
else), verifies every chunk's sha256 (a bad one is asked for again), appends it to `.<name>.part` beside the file,
checks the whole file's sha256 and renames it into place. A pull interrupted on either side resumes from the `.part`
files; memory stays bounded by one chunk. A scan still being recorded has an incomplete manifest: its index,
`frames.jsonl`, is listed as the prefix of its complete lines (it only grows, so that prefix's size and sha256 stay
true while more lines are appended), and a pull writes it after the images of each round, so the pulled scan, like the
recorder's, never indexes a frame whose images are not there yet (a trainer may read it while the pull runs: live
mode). The pull takes what is listed and asks again until complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m3_memory.core.atomic import write_atomic
from m3_memory.core.errors import M3Error

DEFAULT_ROBOT = "default"
SCANS, MEMORIES = "scans", "memories"
MEMORY_SUFFIX = ".pt"
HELD_MARKER = ".m3_manifest.json"
GROWING_FILES = ("frames.jsonl",)  # appended while a scan records: listed as its complete lines until the scan ends
DEFAULT_CHUNK_BYTES = 1 << 20
_ROBOT = re.compile(r"^[A-Za-z0-9_]+$")
_ITEM_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


class StorageError(M3Error, ValueError):
    """A robot name, item id or path that storage cannot use; the message says which and why."""


class TransferError(M3Error):
    """A pull that could not complete (source gone, data that keeps failing its checksum)."""


def robot_name(robot: str) -> str:
    """The storage folder of `robot` (a namespace: leading/trailing slashes are dropped; empty = `default`)."""
    name = robot.strip("/") or DEFAULT_ROBOT
    if not _ROBOT.match(name):
        raise StorageError(f"robot {robot!r}: use one namespace level of letters, digits and '_' (e.g. robot1)")
    return name


def check_item_id(item_id: str, what: str = "id") -> str:
    if not _ITEM_ID.match(item_id or ""):
        raise StorageError(f"{what} {item_id!r}: use letters, digits, '_', '-' and '.' (not first), as the recorder "
                           "names scans (scan_<UTC time>)")
    return item_id


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, memoised per (path, size, mtime) so large files are hashed once per process."""
    path = Path(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _SHA_MEMO[memo_key] = digest.hexdigest()
    return _SHA_MEMO[memo_key]


@dataclass(frozen=True)
class FileEntry:
    path: str       # relative to the item, '/'-separated
    size: int
    sha256: str


@dataclass
class Manifest:
    """What an item is made of. `complete` is false while a scan is still recording (more files will come)."""
    id: str
    complete: bool
    files: list[FileEntry] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> dict:
        return {"id": self.id, "complete": self.complete, "files": [asdict(entry) for entry in self.files]}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        return cls(data["id"], bool(data["complete"]), [FileEntry(**entry) for entry in data["files"]])


def servable(relative: str) -> bool:
    """Whether a relative path may be listed and served: no hidden or temporary component (`.part`, `.tmp`, the
    held marker), no `..`."""
    parts = relative.split("/")
    return bool(relative) and not any(not part or part in (".", "..") or part.startswith(".") for part in parts)


def item_file(item: Path, relative: str) -> Path:
    """The regular file `relative` names inside `item` (a scan directory, or a memory file itself), or StorageError."""
    if item.is_file():
        if relative != item.name:
            raise StorageError(f"{relative!r} is not part of {item.name}")
        return item
    if not servable(relative):
        raise StorageError(f"{relative!r} is not a file that is served")
    path = item / relative
    if path.is_symlink() or not path.is_file():
        raise StorageError(f"{relative!r} is not a file of {item.name}")
    return path


def line_prefix(path: Path) -> tuple[int, str]:
    """(size, sha256) of the prefix of `path`'s complete (newline-terminated) lines: a file still being appended to."""
    data = path.read_bytes()
    data = data[:data.rfind(b"\n") + 1]
    return len(data), hashlib.sha256(data).hexdigest()


def manifest_of(item: Path, complete: bool = True) -> Manifest:
    """The manifest of a scan directory or a memory file; an incomplete scan's growing files are listed as their
    complete lines (`line_prefix`). Symlinks and hidden files are never listed."""
    if item.is_file():
        return Manifest(item.stem, True, [FileEntry(item.name, item.stat().st_size, file_sha256(item))])
    if not item.is_dir():
        raise StorageError(f"{item} does not exist")
    files = []
    for folder, subfolders, names in os.walk(item):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            relative = path.relative_to(item).as_posix()
            if not servable(relative) or path.is_symlink() or not path.is_file():
                continue
            if not complete and relative in GROWING_FILES:
                files.append(FileEntry(relative, *line_prefix(path)))
            else:
                files.append(FileEntry(relative, path.stat().st_size, file_sha256(path)))
    return Manifest(item.name, complete, files)


class Storage:
    """The layout above under `root` (created on first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def scans_dir(self, robot: str) -> Path:
        return self.root / robot_name(robot) / SCANS

    def memories_dir(self, robot: str) -> Path:
        return self.root / robot_name(robot) / MEMORIES

    def scan_dir(self, robot: str, scan_id: str) -> Path:
        return self.scans_dir(robot) / check_item_id(scan_id, "scan id")

    def memory_path(self, robot: str, memory_id: str) -> Path:
        return self.memories_dir(robot) / (check_item_id(memory_id, "memory id") + MEMORY_SUFFIX)

    def robots(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _ROBOT.match(p.name)
                      and ((p / SCANS).is_dir() or (p / MEMORIES).is_dir()))

    def scans(self, robot: str) -> list[Path]:
        """Scan directories of `robot`, oldest first (scan ids are UTC times)."""
        return list_scans(self.scans_dir(robot))

    def memories(self, robot: str) -> list[Path]:
        """Memory files of `robot`, oldest first (by modification time)."""
        return list_memories(self.memories_dir(robot))

    def latest_memory(self, robot: str) -> Path | None:
        memories = self.memories(robot)
        return memories[-1] if memories else None

    def retain(self, robot: str, keep_scans: int, keep_memories: int, protect: Iterable[Path] = ()) -> list[Path]:
        """Delete all but the newest `keep_scans` scans and `keep_memories` memories of `robot` (0 = keep all),
        never one in `protect` (queued, being written); returns what was removed."""
        return retain(self.scans(robot), keep_scans, protect) + retain(self.memories(robot), keep_memories, protect)


def list_scans(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and _ITEM_ID.match(p.name))


def list_memories(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.suffix == MEMORY_SUFFIX and p.is_file() and not p.is_symlink()
             and _ITEM_ID.match(p.name)]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def retain(items: list[Path], keep: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Remove the oldest of `items` (ordered oldest first) beyond the newest `keep`; 0 keeps all."""
    if keep <= 0:
        return []
    protected = {Path(p).resolve() for p in protect}
    removed = []
    for path in items[:-keep]:
        if path.resolve() in protected:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# --- pulling --------------------------------------------------------------------------------------------------
ReadChunk = Callable[[str, int, int], tuple[bytes, str]]  # (path, offset, length) -> (data, its sha256 as sent)


@dataclass
class PullProgress:
    """Counts of one pull, handed to the progress callback after every chunk."""
    bytes_total: int = 0      # of the files listed so far
    bytes_done: int = 0       # verified on this disk (held before the pull included)
    bytes_held: int = 0       # already on this disk when the pull started (complete files and .part prefixes)
    files: int = 0
    chunks: int = 0
    chunks_resent: int = 0    # chunks whose sha256 did not match and were asked for again
    files_refetched: int = 0  # files whose whole sha256 did not match and were fetched again from byte 0
    complete: bool = False


def part_path(path: Path) -> Path:
    return path.parent / f".{path.name}.part"


def held_manifest(item: Path) -> Manifest | None:
    """The verified manifest of a scan pulled completely into `item`, or None when it is not (yet) held."""
    try:
        return Manifest.from_json(json.loads((item / HELD_MARKER).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def receive_file(entry: FileEntry, target: Path, read_chunk: ReadChunk, chunk_bytes: int, progress: PullProgress,
                 on_chunk: Callable[[], None] = lambda: None, retries: int = 5) -> None:
    """Make `target` hold exactly `entry` (size and sha256), fetching what is missing; resumes a `.part`."""
    if target.is_file() and target.stat().st_size == entry.size and file_sha256(target) == entry.sha256:
        return
    part = part_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        digest = hashlib.sha256()
        offset = part.stat().st_size if part.is_file() else 0
        if offset > entry.size:
            part.unlink()
            offset = 0
        if offset:   # chunks are verified before they are appended: the prefix is the file's own
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(chunk_bytes), b""):
                    digest.update(block)
        with open(part, "ab") as handle:
            while offset < entry.size:
                length = min(chunk_bytes, entry.size - offset)
                for tries in range(retries + 1):
                    data, claimed = read_chunk(entry.path, offset, length)
                    if len(data) == length and hashlib.sha256(data).hexdigest() == claimed:
                        break
                    progress.chunks_resent += 1
                else:
                    raise TransferError(f"{entry.path} at byte {offset}: {retries + 1} chunks in a row failed their "
                                        "sha256 check")
                handle.write(data)
                handle.flush()
                digest.update(data)
                offset += length
                progress.chunks += 1
                progress.bytes_done += length
                on_chunk()
            os.fsync(handle.fileno())
        if digest.hexdigest() == entry.sha256:
            os.replace(part, target)
            progress.files += 1
            return
        # a prefix that was not the file's (the source changed, a torn disk): fetch it whole once more
        progress.bytes_done -= entry.size
        progress.files_refetched += 1
        part.unlink()
    raise TransferError(f"{entry.path}: its content does not match the manifest's sha256 after fetching it twice")


def pull_item(get_manifest: Callable[[], Manifest], read_chunk: ReadChunk, target: Path,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: Callable[[PullProgress], None] = lambda p: None,
              should_stop: Callable[[], bool] = lambda: False, poll_seconds: float = 0.5) -> PullProgress:
    """Pull a scan directory (or, when the manifest lists one file named like `target`, a memory file) into `target`.

    Asks for the manifest again until it is complete (a scan still recording), then writes the held marker (scans).
    Raises TransferError from the callables, or when `should_stop()` turns true (the `.part` files stay, to resume).
    """
    stats = PullProgress()
    is_file_item = target.suffix == MEMORY_SUFFIX
    received: set[FileEntry] = set()
    first = True
    while True:
        manifest = get_manifest()
        stats.bytes_total = manifest.total_bytes
        if first:   # what the disk holds already (an earlier, interrupted pull) counts as done
            stats.bytes_held = stats.bytes_done = held_bytes(manifest, target, is_file_item)
            first = False
        # the growing index last: every frame it lists has its images on this disk by then
        for entry in sorted(manifest.files, key=lambda e: e.path in GROWING_FILES):
            if entry in received:
                continue
            if not is_file_item and not servable(entry.path):
                raise TransferError(f"the source listed {entry.path!r}, which is not a plain relative path")
            receive_file(entry, target if is_file_item else target / entry.path, read_chunk, chunk_bytes, stats,
                         on_chunk=lambda: (progress(stats), _stop_if(should_stop)))
            received.add(entry)
            progress(stats)
            _stop_if(should_stop)
        if manifest.complete:
            break
        time.sleep(poll_seconds)
        _stop_if(should_stop)
    stats.complete = True
    if not is_file_item:
        write_atomic(target / HELD_MARKER, lambda h: h.write(json.dumps(manifest.to_json()).encode()))
    progress(stats)
    return stats


def held_bytes(manifest: Manifest, target: Path, is_file_item: bool) -> int:
    """Bytes of `manifest` already on this disk: complete files of the right size and `.part` prefixes."""
    total = 0
    for entry in manifest.files:
        path = target if is_file_item else target / entry.path
        if path.is_file() and path.stat().st_size == entry.size:
            total += entry.size
        elif part_path(path).is_file():
            total += min(part_path(path).stat().st_size, entry.size)
    return total


def _stop_if(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise TransferError("the pull was stopped; its .part files stay and the next pull resumes from them")
