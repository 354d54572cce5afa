"""Shared fixtures: an isolated ROS 2 domain per test session, and real node processes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

VENV_BIN = Path(sys.prefix) / "bin"
REPO = Path(__file__).resolve().parents[1]

# Talk only to processes on this machine, on a domain of our own, so parallel runs and other sessions do not interfere.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))


def run_command(*args: str, timeout: float = 60.0, check: bool = False) -> subprocess.CompletedProcess:
    """Run a venv command (`ros2`, `m3`, ...) and capture its output."""
    result = subprocess.run([str(VENV_BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def interrupt(process: subprocess.Popen, timeout: float) -> None:
    """Stop a running process as Ctrl-C would; killed if it is still there after `timeout` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def ros2_launch(package: str, launch_file: str, *arguments: str, cwd: Path):
    """`ros2 launch PACKAGE FILE name:=value ...` as a real process in `cwd`, its output in `cwd/launch.log`; stopped as
    Ctrl-C would when the block ends, unless the block stopped it."""
    with open(cwd / "launch.log", "w") as log:
        process = subprocess.Popen([str(VENV_BIN / "ros2"), "launch", package, launch_file, *arguments], cwd=cwd,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        interrupt(process, 60)


def listed(*command: str) -> set[str]:
    """The names a venv `ros2 ... list` prints (nodes, topics, services or actions)."""
    return set(run_command("ros2", *command).stdout.split())


@contextlib.contextmanager
def node_process(executable: str, *args: str):
    """A real node in its own process; stopped with SIGINT (as Ctrl-C would) when the block ends."""
    process = subprocess.Popen([str(VENV_BIN / executable), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        yield process
    finally:
        interrupt(process, 15)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture
def ros_node():
    """An rclpy node in the test process (for clients, publishers and subscribers)."""
    import rclpy

    rclpy.init()
    node = rclpy.create_node("m3_test_client")
    yield node
    node.destroy_node()
    rclpy.try_shutdown()


@pytest.fixture(scope="session")
def tiny_memory(tmp_path_factory):
    """A copy of the tiny scene with a 200-iteration m3-tinyvlm memory in it: `(scene root, memory path, memory)`."""
    import shutil

    from m3_memory.core.pipeline import load_train_config, scene_features
    from m3_memory.core.scene import Scene
    from m3_memory.core.trainer import train
    from m3_memory.sim import demo_scene

    root = tmp_path_factory.mktemp("memory") / "tiny"
    shutil.copytree(demo_scene("tiny"), root, ignore=shutil.ignore_patterns("bag", "previews"))
    scene = Scene.load(root)
    config = load_train_config(None, {"iterations": 200, "densify": {"refine_start_iter": 100, "refine_every": 50}})
    memory = train(scene, scene_features(scene, root, ["m3-tinyvlm"]), config, root / "memory.pt")
    return root, root / "memory.pt", memory


@pytest.fixture(scope="module")
def memory_server():
    with node_process("m3_memory_server") as process:
        yield process
