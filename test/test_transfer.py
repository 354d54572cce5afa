"""Scans travel from the recorder to the trainer over ROS (issue #14): chunked pulls verified by sha256, resumed after
the trainer is killed mid-transfer, a chunk corrupted in transit detected and sent again, a scan still recording
pulled as it grows. The pull itself is tested directly; the nodes are real processes over DDS."""
import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN, node_process, wait_for
from m3_memory.core.jobs import JobQueue
from m3_memory.core.storage import (HELD_MARKER, Manifest, Storage, StorageError, TransferError, held_manifest,
                                    item_file, manifest_of, part_path, pull_item)
from m3_memory.sim import demo_scene

SCAN_ID = "scan_20260101_120000_000000"


def digests(root: Path) -> dict[str, str]:
    """sha256 of every visible file below `root` (what the recorder wrote; the trainer adds features/ later)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.relative_to(root).parts[0] != "features"}


@pytest.fixture
def scan(tmp_path) -> Path:
    """A recorder's scans folder holding the tiny scene as one scan, with a 2 MB blob fetched first (so a pull
    interrupted early stops inside a file)."""
    root = tmp_path / "robot_disk" / "scans" / SCAN_ID
    shutil.copytree(demo_scene("tiny"), root, ignore=shutil.ignore_patterns("bag", "previews"))
    (root / "aa_blob.bin").write_bytes(os.urandom(2 << 20))
    return root


def reader(source: Path, corrupt_every: int = 0):
    """A read_chunk over a local folder; every `corrupt_every`-th answer has a flipped byte (its sha256 is right)."""
    calls = []

    def read_chunk(path: str, offset: int, length: int):
        calls.append((path, offset))
        with open(item_file(source, path), "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        digest = hashlib.sha256(data).hexdigest()
        if corrupt_every and len(calls) % corrupt_every == 0:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data, digest
    return read_chunk, calls


def test_pull_resumes_a_part_file_and_rejects_corrupt_chunks(scan, tmp_path):
    target = tmp_path / "worker" / SCAN_ID
    read_chunk, calls = reader(scan, corrupt_every=4)
    chunks = []

    def stop_midway():   # the worker "dies" after 20 chunks, half-way through the blob
        return len(chunks) >= 20

    with pytest.raises(TransferError, match="stopped"):
        pull_item(lambda: manifest_of(scan), read_chunk, target, chunk_bytes=64 << 10,
                  progress=lambda p: chunks.append(p.chunks), should_stop=stop_midway)
    part = part_path(target / "aa_blob.bin")
    assert part.is_file() and 0 < part.stat().st_size < (2 << 20) and held_manifest(target) is None
    assert not (target / "aa_blob.bin").exists()       # nothing unverified takes a file's name
    resumed_from = part.stat().st_size

    calls.clear()
    stats = pull_item(lambda: manifest_of(scan), read_chunk, target, chunk_bytes=64 << 10)
    assert stats.complete and stats.bytes_held == resumed_from and stats.chunks_resent > 0
    assert ("aa_blob.bin", 0) not in calls              # resumed, not started again
    assert digests(target) == digests(scan)
    assert held_manifest(target).files == manifest_of(scan).files
    assert not list(target.rglob("*.part"))


def test_a_chunk_that_always_fails_its_checksum_ends_the_pull(scan, tmp_path):
    read_chunk, _ = reader(scan, corrupt_every=1)
    with pytest.raises(TransferError, match="failed their sha256 check"):
        pull_item(lambda: manifest_of(scan), read_chunk, tmp_path / "worker" / SCAN_ID)
    assert not (tmp_path / "worker" / SCAN_ID / "aa_blob.bin").exists()


def test_a_growing_scan_lists_its_complete_index_lines_and_pulls_them_after_the_images(scan, tmp_path):
    index = scan / "frames.jsonl"
    lines = index.read_bytes()
    with open(index, "ab") as handle:   # the recorder is half-way through appending a line
        handle.write(b'{"id": "000099", "rgb": ')
    incomplete = manifest_of(scan, complete=False)
    listed = next(f for f in incomplete.files if f.path == "frames.jsonl")
    assert not incomplete.complete and listed.size == len(lines)
    assert listed.sha256 == hashlib.sha256(lines).hexdigest()
    index.write_bytes(lines)
    answers = iter([incomplete, incomplete, manifest_of(scan)])
    read_chunk, calls = reader(scan)
    target = tmp_path / "worker" / SCAN_ID
    stats = pull_item(lambda: next(answers), read_chunk, target, poll_seconds=0.01)
    assert stats.complete and digests(target) == digests(scan)
    paths = [path for path, _ in calls]
    assert paths.index("frames.jsonl") > max(i for i, path in enumerate(paths) if path.startswith(("rgb/", "depth/")))
    for bad in ("../x", ".hidden", "rgb/../../x", "", HELD_MARKER):
        with pytest.raises(StorageError):
            item_file(scan, bad)


def test_storage_layout_listing_and_retention(tmp_path):
    storage = Storage(tmp_path)
    for i in range(4):
        (storage.scan_dir("robot1", f"scan_2026010{i}_000000_000000") / "rgb").mkdir(parents=True)
        path = storage.memory_path("robot1", f"scan_2026010{i}_000000_000000")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"m")
        os.utime(path, ns=(i * 10**9, i * 10**9))
    assert storage.robots() == ["robot1"] and storage.latest_memory("robot1").stem.endswith("03_000000_000000")
    assert storage.scan_dir("/robot1", "x") == tmp_path.resolve() / "robot1" / "scans" / "x"
    assert storage.scans_dir("") == tmp_path.resolve() / "default" / "scans"
    protect = [storage.scans("robot1")[0]]
    removed = storage.retain("robot1", keep_scans=2, keep_memories=1, protect=protect)
    assert len(removed) == 1 + 3
    assert [p.name for p in storage.scans("robot1")] == ["scan_20260100_000000_000000", "scan_20260102_000000_000000",
                                                          "scan_20260103_000000_000000"]
    assert [p.stem for p in storage.memories("robot1")] == ["scan_20260103_000000_000000"]
    for robot, item in (("a/b", "x"), ("robot1", "../x"), ("robot1", ".x")):
        with pytest.raises(StorageError):
            storage.scan_dir(robot, item)
    assert Manifest.from_json(manifest_of(storage.memories("robot1")[0]).to_json()).files[0].size == 1


# --- real nodes -----------------------------------------------------------------------------------------------
def send_goal(node, client, **fields):
    import rclpy
    from m3_msgs.action import Train

    feedback = []
    future = client.send_goal_async(Train.Goal(**fields), feedback_callback=lambda m: feedback.append(m.feedback))
    rclpy.spin_until_future_complete(node, future, timeout_sec=30)
    handle = future.result()
    assert handle is not None and handle.accepted
    return handle, feedback


def result_of(node, handle, timeout=180):
    import rclpy

    future = handle.get_result_async()
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    assert future.done(), "no result"
    return future.result()


def trainer_args(storage: Path, *extra: str) -> list[str]:
    return ["--ros-args", "-p", f"storage_root:={storage}", "-p", "transfer_chunk_bytes:=32768", *extra]


@pytest.fixture
def recorder_env():
    """Node processes inherit the test's environment: the hooks are set only for the block that needs them."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_trainer_killed_mid_transfer_resumes_and_the_scene_is_bit_identical(ros_node, scan, tmp_path, recorder_env):
    from m3_msgs.action import Train
    from rclpy.action import ActionClient

    worker = tmp_path / "worker_disk"
    recorder_env["M3_TEST_CHUNK_DELAY_S"] = "0.03"    # a slow link: the kill lands inside the blob
    with node_process("m3_recorder", "--ros-args", "-p", f"output_root:={scan.parent}"):
        del recorder_env["M3_TEST_CHUNK_DELAY_S"]
        trainer = subprocess.Popen([str(VENV_BIN / "m3_trainer"), *trainer_args(worker)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            client = ActionClient(ros_node, Train, "m3/train")
            assert client.wait_for_server(timeout_sec=30)
            _, feedback = send_goal(ros_node, client, scan_id=str(scan), config_overrides="iterations: 2")
            import rclpy
            assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or any(
                f.stage == "fetching" and f.bytes_done > (512 << 10) for f in feedback), timeout=120), feedback
        finally:
            trainer.send_signal(signal.SIGKILL)
            trainer.wait()
        copy = worker / "default" / "scans" / SCAN_ID
        part = part_path(copy / "aa_blob.bin")
        assert part.is_file() and 0 < part.stat().st_size < (2 << 20), "killed outside the blob"
        assert held_manifest(copy) is None and (worker / "queue.json").is_file()

        # restarted, the worker runs the saved job by itself: the pull resumes from the .part and training follows
        with node_process("m3_trainer", *trainer_args(worker)) as restarted:
            memory = worker / "default" / "memories" / f"{SCAN_ID}.pt"
            assert wait_for(lambda: memory.is_file(), timeout=240), "the restored job wrote no memory"
        log = restarted.stdout.read()
        assert "1 job(s) restored" in log and "held already" in log, log
        held = float(log.split("MB held already")[0].rsplit("(", 1)[1])
        assert held > 0.5, log    # MB resumed, not fetched again
    assert digests(copy) == digests(scan)
    assert JobQueue(worker / "queue.json").load() == []     # the job ended: the saved queue is empty


def test_a_corrupted_chunk_is_detected_and_sent_again(ros_node, scan, tmp_path, recorder_env):
    from m3_msgs.action import Train
    from rclpy.action import ActionClient

    worker = tmp_path / "worker_disk"
    recorder_env["M3_TEST_CORRUPT_CHUNK_EVERY"] = "5"
    with node_process("m3_recorder", "--ros-args", "-p", f"output_root:={scan.parent}"):
        del recorder_env["M3_TEST_CORRUPT_CHUNK_EVERY"]
        with node_process("m3_trainer", *trainer_args(worker)):
            client = ActionClient(ros_node, Train, "m3/train")
            assert client.wait_for_server(timeout_sec=30)
            handle, _ = send_goal(ros_node, client, scan_id=SCAN_ID, config_overrides="iterations: 2")
            answer = result_of(ros_node, handle)
            assert answer.result.success, answer.result.message
            assert "corrupted chunk(s) re-sent" in answer.result.message, answer.result.message
            assert "every file's sha256 verified" in answer.result.message
            missing, _ = send_goal(ros_node, client, scan_id="scan_20990101_000000_000000")
            refused = result_of(ros_node, missing)
            assert not refused.result.success and "fetching the scan failed" in refused.result.message
            assert "no scan" in refused.result.message, refused.result.message
    assert digests(worker / "default" / "scans" / SCAN_ID) == digests(scan)
    assert (worker / "default" / "memories" / f"{SCAN_ID}.pt").is_file()


def test_m3_scans_and_memories_list_a_storage_root(scan, tmp_path):
    import json

    from conftest import run_command

    root = scan.parents[2]
    shutil.move(str(scan.parents[1]), str(root / "robot1"))   # robot_disk/scans → robot_disk/robot1/scans
    (root / "robot1" / "memories").mkdir()
    (root / "robot1" / "memories" / f"{SCAN_ID}.pt").write_bytes(b"x" * 10)
    listing = run_command("m3", "scans", "--root", str(root), check=True).stdout
    scans = [json.loads(line) for line in listing.splitlines()]
    assert [(s["robot"], s["id"], s["held"]) for s in scans] == [("robot1", SCAN_ID, False)] and scans[0]["frames"] > 0
    memories = run_command("m3", "memories", "--root", str(root), "--robot", "robot1", check=True).stdout
    assert json.loads(memories)["bytes"] == 10


def test_a_recorder_restarted_mid_transfer_is_waited_for_and_the_pull_completes(ros_node, scan, tmp_path,
                                                                                recorder_env):
    import rclpy
    from m3_msgs.action import Train
    from rclpy.action import ActionClient

    worker = tmp_path / "worker_disk"
    recorder_args = ("m3_recorder", "--ros-args", "-p", f"output_root:={scan.parent}")
    recorder_env["M3_TEST_CHUNK_DELAY_S"] = "0.03"
    recorder = subprocess.Popen([str(VENV_BIN / recorder_args[0]), *recorder_args[1:]], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    del recorder_env["M3_TEST_CHUNK_DELAY_S"]
    try:
        with node_process("m3_trainer", *trainer_args(worker)):
            client = ActionClient(ros_node, Train, "m3/train")
            assert client.wait_for_server(timeout_sec=30)
            handle, feedback = send_goal(ros_node, client, scan_id=SCAN_ID, config_overrides="iterations: 2")
            assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or any(
                f.stage == "fetching" and f.bytes_done > (512 << 10) for f in feedback), timeout=120), feedback
            recorder.send_signal(signal.SIGKILL)    # the robot's side goes down mid-transfer and comes back
            recorder.wait()
            with node_process(*recorder_args):
                answer = result_of(ros_node, handle)
            assert answer.result.success, answer.result.message
    finally:
        if recorder.poll() is None:
            recorder.kill()
    assert digests(worker / "default" / "scans" / SCAN_ID) == digests(scan)
