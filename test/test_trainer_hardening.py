"""The trainer refuses, with the reason, every goal it cannot run safely: paths outside its roots, files it must not
overwrite, settings of the wrong name, type or range (issue #17). Planning is tested directly; the real node process
answers the same over DDS, and an aborted goal writes nothing."""
import os
import shutil
from pathlib import Path

import pytest
import rclpy
import torch
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from safetensors.torch import save as save_safetensors

from conftest import node_process, wait_for
from m3_memory.core.checkpoint import CHECKPOINT_FORMAT, memory_format
from m3_memory.core.errors import M3Error
from m3_memory.core.paths import confine
from m3_memory.core.pipeline import DEFAULT_TRAIN_CONFIG, load_train_config
from m3_memory.core.trainer import ConfigError, TrainConfig
from m3_memory.sim import demo_scene


def tree(root: Path) -> dict:
    """Every path below `root` with its size and modification time: what a refused goal must leave unchanged."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def roots(tmp_path):
    """scans/ with a scene, memories/ with a note that is not a memory, outside/ beside them, and symlinks out."""
    scans, memories, outside = tmp_path / "scans", tmp_path / "memories", tmp_path / "outside"
    for folder in (scans / "scene", memories, outside / "scene"):
        folder.mkdir(parents=True)
    for folder in (scans / "scene", outside / "scene"):
        (folder / "scene.json").write_text("{}")
    (memories / "notes.txt").write_text("not a memory")
    (outside / "victim.pt").write_text("an unrelated file")
    (scans / "link").symlink_to(outside / "scene")
    (memories / "out").symlink_to(outside)
    return scans, memories, outside


def test_confine_resolves_symlinks_and_dots(roots):
    scans, memories, outside = roots
    assert confine(scans / "scene", [scans]) == (scans / "scene").resolve()
    assert confine(scans, [memories, scans]) == scans.resolve()
    assert confine(memories / "new" / "m.pt", [memories]) == (memories / "new" / "m.pt").resolve()
    for path in (scans / "link", scans / ".." / "outside", memories / "out" / "victim.pt", "/etc/m3_probe.pt",
                 Path(str(scans) + "-evil")):   # a sibling whose name starts like the root is not under it
        with pytest.raises(M3Error, match="outside the configured roots"):
            confine(path, [scans, memories])
    with pytest.raises(M3Error, match="no roots"):
        confine(scans, [])


@pytest.mark.parametrize("overrides, message", [
    ({"iterations": "abc"}, "iterations must be int, got 'abc'"),
    ({"iterations": 0}, "iterations must be at least 1, got 0"),
    ({"iterations": -5}, "iterations must be at least 1, got -5"),
    ({"densify": 5}, "densify must be a mapping of settings, got 5"),
    ({"densify": {"refine_every": 1.5}}, "densify.refine_every must be int, got 1.5"),
    ({"lr": {"means": "fast"}}, "lr.means must be float, got 'fast'"),
    ({"learnable_wm": "yes"}, "learnable_wm must be bool, got 'yes'"),
    ({"iteratons": 5}, r"unknown training settings \['iteratons'\]; known: \['densify'"),
    ({"densify": {"every": 5}}, r"unknown training settings \['densify.every'\]; known in densify"),
    ({"psc": {"clip": 0.9}}, "psc.clip must be a mapping of settings, got 0.9"),
    ({"psc": {"mine": {"chunk": 10}}}, r"psc.mine lack required settings \['threshold'\]"),
    ({"log_every": 0}, "log_every must be at least 1"),
    ({"temperature": 0}, "temperature must be positive"),
    ({"device": "gpu"}, "device must be auto, cpu or cuda"),
])
def test_settings_are_type_checked_against_the_dataclasses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


def test_settings_keep_their_types():
    config = load_train_config(None, {"lr": {"means": 1}, "psc": {"mine": {"threshold": 1}}, "iterations": 3})
    assert config.lr.means == 1.0 and isinstance(config.lr.means, float) and config.psc["mine"].threshold == 1.0
    assert config.iterations == 3 and config.densify.refine_start_iter == 300   # the rest from config/train.yaml
    assert TrainConfig.from_dict({}) == TrainConfig()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="device 'cuda' needs CUDA"):
        load_train_config(None, {"device": "cuda"})


def goal(scene_dir="", output="", overrides=""):
    from m3_msgs.action import Train

    return Train.Goal(scene_dir=str(scene_dir), output=str(output), config_overrides=overrides)


def refusals(scans: Path, memories: Path, outside: Path) -> list[tuple]:
    """(goal, what the reason says) for every way a goal can be refused before training starts."""
    scene = scans / "scene"
    cases = [
        (goal(""), "scene_dir is empty"),
        (goal(outside / "scene"), "outside the configured roots"),
        (goal(scans / "link"), "outside the configured roots"),
        (goal(scans / ".." / "outside" / "scene"), "outside the configured roots"),
        (goal(scans / "missing"), "no scene.json"),
        (goal(scene, overrides="[1, 2]"), "must be a YAML mapping"),
        (goal(scene, overrides="iterations: [1"), "not valid YAML"),
        (goal(scene, overrides="iterations: abc"), "iterations must be int, got 'abc'"),
        (goal(scene, overrides="iterations: 0"), "iterations must be at least 1, got 0"),
        (goal(scene, overrides="iterations: -5"), "iterations must be at least 1, got -5"),
        (goal(scene, overrides="densify: 5"), "densify must be a mapping"),
        (goal(scene, output="/etc/m3_probe.pt"), "outside the configured roots"),
        (goal(scene, output="../../m3_probe.pt"), "outside the configured roots"),
        (goal(scene, output="out/victim.pt"), "outside the configured roots"),
        (goal(scene, output=outside / "victim.pt"), "outside the configured roots"),
        (goal(scene, output="notes.txt"), "is not a memory: it is never overwritten"),
        (goal(scene, output="."), "is a folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((goal(scene, overrides="device: cuda"), "needs CUDA"))
    return cases


def test_goal_planning_refuses_with_the_reason_and_touches_nothing(roots, tmp_path):
    from m3_memory.ros.trainer import plan_goal

    scans, memories, outside = roots
    before = tree(tmp_path)
    for train_goal, message in refusals(scans, memories, outside):
        with pytest.raises((M3Error, ValueError), match=message):
            plan_goal(train_goal, [scans], memories, DEFAULT_TRAIN_CONFIG)
    assert tree(tmp_path) == before
    assert not Path("/etc/m3_probe.pt").exists()

    job = plan_goal(goal(scans / "scene"), [scans], memories, DEFAULT_TRAIN_CONFIG)
    assert job.scene_dir == (scans / "scene").resolve() and job.output == (memories / "scene.pt").resolve()
    assert job.config.iterations == 2000
    job = plan_goal(goal(scans / "scene", output="robot/table.pt", overrides="iterations: 5"), [scans], memories,
                    DEFAULT_TRAIN_CONFIG)
    assert job.output == (memories / "robot" / "table.pt").resolve() and job.config.iterations == 5
    # an existing memory may be replaced (retraining into the same name), whatever its extension
    (memories / "old.bin").write_bytes(save_safetensors({}, metadata={"format": CHECKPOINT_FORMAT, "payload": "{}"}))
    assert plan_goal(goal(scans / "scene", output="old.bin"), [scans], memories, DEFAULT_TRAIN_CONFIG).output.is_file()


def send(node, client, train_goal, feedback=None):
    future = client.send_goal_async(train_goal, feedback_callback=feedback)
    rclpy.spin_until_future_complete(node, future, timeout_sec=20)
    handle = future.result()
    assert handle is not None and handle.accepted   # goals are accepted; the reason comes with the result
    return handle


def result_of(node, handle, timeout=120):
    future = handle.get_result_async()
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    assert future.done(), "no result"
    return future.result()


@pytest.fixture
def trainer_client(ros_node, roots, tmp_path_factory):
    from m3_msgs.action import Train

    scans, memories, _ = roots
    litter = memories / ".tiny.pt.k3j9x0q2.tmp"   # what a trainer killed during a checkpoint save leaves
    litter.write_bytes(b"half a checkpoint")
    with node_process("m3_trainer", "--ros-args", "-p", f"scene_roots:=['{scans}']",
                      "-p", f"output_root:={memories}",
                      "-p", f"storage_root:={tmp_path_factory.mktemp('storage')}") as process:
        client = ActionClient(ros_node, Train, "m3/train")
        assert client.wait_for_server(timeout_sec=30), "no /m3/train"
        assert not litter.exists()                            # removed when the trainer started
        yield client
        assert process.poll() is None, "the trainer exited"


def test_node_aborts_refused_goals_with_the_reason_and_writes_nothing(ros_node, roots, trainer_client, tmp_path):
    scans, memories, outside = roots
    before = tree(tmp_path)
    for train_goal, message in refusals(scans, memories, outside):
        answer = result_of(ros_node, send(ros_node, trainer_client, train_goal), timeout=30)
        assert answer.status == GoalStatus.STATUS_ABORTED, message
        assert not answer.result.success and "goal refused" in answer.result.message
        assert message in answer.result.message, answer.result.message
    assert tree(tmp_path) == before


def test_node_queues_a_second_goal_while_training_then_trains(ros_node, roots, trainer_client, tmp_path):
    from std_msgs.msg import String

    from m3_memory.ros.qos import LATCHED

    scans, memories, _ = roots
    shutil.copytree(demo_scene("tiny"), scans / "tiny", ignore=shutil.ignore_patterns("bag", "previews"))
    announced = []
    ros_node.create_subscription(String, "m3/checkpoint", lambda msg: announced.append(msg.data), LATCHED)
    progress = []
    first = send(ros_node, trainer_client, goal(scans / "tiny", overrides="{iterations: 100000, log_every: 1}"),
                 feedback=progress.append)
    assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or progress, timeout=120), "no feedback"
    queued = send(ros_node, trainer_client, goal(scans / "tiny"))   # queued behind the first (issue #14)
    rclpy.spin_until_future_complete(ros_node, queued.cancel_goal_async(), timeout_sec=20)
    busy = result_of(ros_node, queued, timeout=30)
    assert busy.status == GoalStatus.STATUS_CANCELED and "never ran" in busy.result.message
    cancel = first.cancel_goal_async()
    rclpy.spin_until_future_complete(ros_node, cancel, timeout_sec=20)
    cancelled = result_of(ros_node, first, timeout=60)
    assert cancelled.status == GoalStatus.STATUS_CANCELED and "previous memory stays" in cancelled.result.message
    assert not [p for p in memories.rglob("*") if p.name != "notes.txt" and not p.is_symlink()]

    done = result_of(ros_node, send(ros_node, trainer_client, goal(scans / "tiny", "robot/tiny.pt",
                                                                    "iterations: 2")))
    assert done.status == GoalStatus.STATUS_SUCCEEDED and done.result.success, done.result.message
    written = (memories / "robot" / "tiny.pt").resolve()
    assert done.result.checkpoint == str(written) and memory_format(written) == CHECKPOINT_FORMAT
    assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or str(written) in announced, timeout=10)
    assert not list(written.parent.glob(".*.tmp")) and os.stat(written).st_size > 0
