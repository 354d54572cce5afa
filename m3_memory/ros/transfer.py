"""Scans and memories between machines over the ROS graph: chunked, verified, resumable pulls (m3_memory.core.storage).

A node that owns data serves it with `TransferServer`: `<prefix>/manifest` (m3_msgs/srv/Manifest: an item's files
with sizes and sha256) and `<prefix>/chunk` (m3_msgs/srv/Chunk: bytes of one file and their sha256). The recorder serves
its scans under `m3/recorder/...`, the trainer its memories (and the scans it holds) under `m3/trainer/...`, both
relative to their namespace. `TransferClient.pull` fetches an item into this machine's storage; `MemorySync` keeps a
memory server's robot on the newest memory of the worker.

Test hooks (environment of the serving process, never set in deployment): `M3_TEST_CORRUPT_CHUNK_EVERY=N` flips a byte
of every N-th chunk after its sha256 was taken (corruption in transit); `M3_TEST_CHUNK_DELAY_S=s` waits before each
chunk answer (a slow link, so a test can kill a client mid-transfer).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from m3_msgs.srv import Chunk, Manifest as ManifestSrv
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String

from m3_memory.core.errors import M3Error
from m3_memory.core.storage import (DEFAULT_CHUNK_BYTES, MEMORY_SUFFIX, FileEntry, Manifest, PullProgress, Storage,
                                    StorageError, TransferError, check_item_id, item_file, list_memories, list_scans,
                                    manifest_of, pull_item, robot_name)
from m3_memory.ros.qos import LATCHED

MAX_CHUNK_BYTES = 4 << 20          # the most one chunk answer carries, whatever a client asks
CALL_TIMEOUT_S = 10.0              # one service call
SOURCE_TIMEOUT_S = 30.0            # how long a pull waits for a source that went away (restarting, network down)
KINDS = ("scan", "memory")


def own_robot(node: Node) -> str:
    return robot_name(node.get_namespace())


class TransferServer:
    """Serves items to pulls. `scans(robot)` / `memories(robot)` give the folder holding that robot's scans / memories
    (None: not served here); `complete(scan_dir)` says whether a scan is finished (its index may be listed)."""

    def __init__(self, node: Node, prefix: str, scans: Callable[[str], Path | None],
                 memories: Callable[[str], Path | None] = lambda robot: None,
                 complete: Callable[[Path], bool] = lambda scan: True):
        self.node, self.scans, self.memories, self.complete = node, scans, memories, complete
        self.robot = own_robot(node)
        self._corrupt_every = int(os.environ.get("M3_TEST_CORRUPT_CHUNK_EVERY", "0"))
        self._delay_s = float(os.environ.get("M3_TEST_CHUNK_DELAY_S", "0"))
        self._answered = 0
        self._lock = threading.Lock()
        group = ReentrantCallbackGroup()
        node.create_service(ManifestSrv, f"{prefix}/manifest", self.on_manifest, callback_group=group)
        node.create_service(Chunk, f"{prefix}/chunk", self.on_chunk, callback_group=group)

    def item(self, kind: str, robot: str, item_id: str) -> tuple[Path, bool]:
        """(path of the item, whether it is complete); StorageError saying why not."""
        robot = robot_name(robot or self.robot)
        if kind not in KINDS:
            raise StorageError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
        folder = (self.scans if kind == "scan" else self.memories)(robot)
        if folder is None:
            raise StorageError(f"this node serves no {kind}s of robot {robot!r}")
        if not item_id:
            items = list_scans(folder) if kind == "scan" else list_memories(folder)
            if not items:
                raise StorageError(f"no {kind} of robot {robot!r} here yet")
            path = items[-1]
        else:
            path = folder / (check_item_id(item_id, f"{kind} id") + (MEMORY_SUFFIX if kind == "memory" else ""))
        complete = kind == "memory" or self.complete(path)
        if not path.exists() and complete:
            raise StorageError(f"no {kind} {path.name!r} of robot {robot!r} here")
        return path, complete

    def on_manifest(self, request, response):
        try:
            path, complete = self.item(request.kind, request.robot, request.id)
            manifest = manifest_of(path, complete) if path.exists() else Manifest(path.name, False)
        except (M3Error, OSError) as exc:
            response.success, response.message = False, str(exc)
            return response
        response.success, response.id, response.complete = True, manifest.id, manifest.complete
        response.paths = [f.path for f in manifest.files]
        response.sizes = [f.size for f in manifest.files]
        response.sha256 = [f.sha256 for f in manifest.files]
        response.max_chunk_bytes = MAX_CHUNK_BYTES
        return response

    def on_chunk(self, request, response):
        try:
            path, complete = self.item(request.kind, request.robot, request.id)
            with open(item_file(path, request.path), "rb") as handle:
                handle.seek(request.offset)
                data = handle.read(min(request.length, MAX_CHUNK_BYTES))
        except (M3Error, OSError) as exc:
            response.success, response.message = False, str(exc)
            return response
        response.sha256 = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._answered += 1
            corrupt = self._corrupt_every > 0 and self._answered % self._corrupt_every == 0
        if corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if self._delay_s:
            time.sleep(self._delay_s)
        response.success, response.data = True, data
        return response


def serve_scans(node: Node, scans_dir: Path, recording: Callable[[], list[Path]]) -> TransferServer:
    """The recorder's server (`m3/recorder/manifest`, `m3/recorder/chunk`): its own robot's scans from `scans_dir`;
    a scan in `recording()` (its writer still running) is listed without its index, as incomplete."""
    robot = own_robot(node)
    return TransferServer(node, "m3/recorder", scans=lambda r: Path(scans_dir) if r == robot else None,
                          complete=lambda scan: scan not in recording())


class TransferClient:
    """Pulls from the TransferServer at `prefix` (e.g. `/robot1/m3/recorder`). Safe to use from any thread except
    the executor's only one: the answers are taken by the executor (use a multi-threaded one, as spin_node does)."""

    def __init__(self, node: Node, prefix: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 source_timeout_s: float = SOURCE_TIMEOUT_S):
        self.node, self.prefix = node, prefix
        self.chunk_bytes, self.source_timeout_s = chunk_bytes, source_timeout_s
        group = ReentrantCallbackGroup()
        self.manifest_client = node.create_client(ManifestSrv, f"{prefix}/manifest", callback_group=group)
        self.chunk_client = node.create_client(Chunk, f"{prefix}/chunk", callback_group=group)

    def _call(self, client, request, should_stop: Callable[[], bool]):
        """One answer, waiting up to `source_timeout_s` for the server (it may be restarting); TransferError else."""
        deadline = time.monotonic() + self.source_timeout_s
        while True:
            if client.wait_for_service(timeout_sec=1.0):
                future = client.call_async(request)
                done = threading.Event()
                future.add_done_callback(lambda _: done.set())
                if done.wait(CALL_TIMEOUT_S):
                    return future.result()
                client.remove_pending_request(future)
            if should_stop():
                raise TransferError("the pull was stopped; its .part files stay and the next pull resumes from them")
            if time.monotonic() > deadline:
                raise TransferError(f"{client.srv_name} did not answer for {self.source_timeout_s:.0f} s: is the "
                                    "node that holds the data running and in this ROS domain?")

    def manifest(self, kind: str, robot: str, item_id: str,
                 should_stop: Callable[[], bool] = lambda: False) -> Manifest:
        answer = self._call(self.manifest_client, ManifestSrv.Request(kind=kind, robot=robot, id=item_id), should_stop)
        if not answer.success:
            raise TransferError(f"{self.prefix}: {answer.message}")
        files = [FileEntry(p, int(s), h) for p, s, h in zip(answer.paths, answer.sizes, answer.sha256)]
        self.chunk_bytes = min(self.chunk_bytes, answer.max_chunk_bytes or self.chunk_bytes)
        return Manifest(answer.id, answer.complete, files)

    def pull(self, kind: str, robot: str, item_id: str, target: Path,
             progress: Callable[[PullProgress], None] = lambda p: None,
             should_stop: Callable[[], bool] = lambda: False) -> PullProgress:
        """Fetch the item into `target` (a scan directory, or a memory's file path); resumes an earlier pull."""
        def read_chunk(path: str, offset: int, length: int) -> tuple[bytes, str]:
            answer = self._call(self.chunk_client, Chunk.Request(kind=kind, robot=robot, id=item_id, path=path,
                                                                 offset=offset, length=length), should_stop)
            if not answer.success:
                raise TransferError(f"{self.prefix}: {answer.message}")
            return answer.data.tobytes() if hasattr(answer.data, "tobytes") else bytes(answer.data), answer.sha256

        return pull_item(lambda: self.manifest(kind, robot, item_id, should_stop), read_chunk, target,
                         self.chunk_bytes, progress, should_stop)


class MemorySync:
    """Keeps the newest memory of this node's robot from a worker (`<source>/manifest`, e.g. `/m3/trainer`) on this
    machine's storage, and hands each verified file to `load(path)` (which swaps it in only once it has loaded: the
    previous memory serves until then). Asks at start, when the worker announces one on `<source>/memory_ready`,
    and every `poll_seconds` (a server that missed an announcement catches up)."""

    def __init__(self, node: Node, source: str, storage: Storage, robot: str, load: Callable[[str], None],
                 poll_seconds: float = 10.0):
        self.node, self.storage, self.robot, self.load = node, storage, robot_name(robot), load
        self.poll_seconds = poll_seconds
        self.client = TransferClient(node, source)
        self.current_sha: str | None = None
        self.wake, self.stopped = threading.Event(), threading.Event()
        node.create_subscription(String, f"{source}/memory_ready", self.on_ready, LATCHED,
                                 callback_group=ReentrantCallbackGroup())
        self.thread = threading.Thread(target=self.run, name="memory-sync", daemon=True)
        self.thread.start()

    @classmethod
    def from_parameters(cls, node: Node, load: Callable[[str], None]) -> "MemorySync | None":
        """From the node's `memory_source` (empty = off), `storage_root`, `robot` (empty = the namespace) and
        `memory_poll_seconds` parameters."""
        p = node.declare_parameter
        source = p("memory_source", "").value
        storage, robot = Storage(p("storage_root", "storage").value), p("robot", "").value or own_robot(node)
        poll = p("memory_poll_seconds", 10.0).value
        return cls(node, source, storage, robot, load, poll) if source else None

    def on_ready(self, msg: String) -> None:
        try:
            robot = json.loads(msg.data).get("robot")
        except (ValueError, AttributeError):
            return
        if robot == self.robot:
            self.wake.set()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.sync_once()
            except Exception as exc:   # a pull must never end the thread: the next wake-up tries again
                self.node.get_logger().warning(f"memory sync: {exc}", throttle_duration_sec=30.0)
            self.wake.wait(self.poll_seconds)
            self.wake.clear()

    def sync_once(self) -> bool:
        """Fetch and load the worker's newest memory of this robot if it is not the one loaded; True if it did."""
        try:
            manifest = self.client.manifest("memory", self.robot, "", self.stopped.is_set)
        except TransferError as exc:
            if "no memory" not in str(exc):
                raise
            return False
        if not manifest.files or manifest.files[0].sha256 == self.current_sha:
            return False
        target = self.storage.memory_path(self.robot, manifest.id)
        self.client.pull("memory", self.robot, manifest.id, target, should_stop=self.stopped.is_set)
        self.node.get_logger().info(f"memory {manifest.id} of {self.robot} fetched and verified: {target}")
        self.current_sha = manifest.files[0].sha256
        self.load(str(target))
        return True
