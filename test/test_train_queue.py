"""Training goals queue FIFO (issue #14): a goal sent while another trains waits with its place in the feedback,
cancelling a queued goal removes it, and the saved queue survives the process."""
import shutil

import rclpy
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient

from conftest import node_process, wait_for
from m3_memory.core.jobs import Job, JobQueue
from m3_memory.sim import demo_scene


def test_queue_is_saved_in_order_and_restored_as_queued(tmp_path):
    queue = JobQueue(tmp_path / "queue.json")
    assert queue.load() == [] and queue.start_next() is None
    assert queue.add(Job("a", robot="robot1", scan_id="scan_1")) == 0
    assert queue.add(Job("b", scene_dir="/data/x", config_overrides="iterations: 5")) == 1
    assert queue.add(Job("c")) == 2
    assert queue.start_next().job_id == "a" and queue.start_next() is None   # one at a time
    assert not queue.remove_queued("a")                                       # running: cancelled in training
    assert queue.remove_queued("c") and queue.position("b") == 1 and queue.position("c") is None

    restored = JobQueue(tmp_path / "queue.json").load()   # a restart: the running job runs again, first
    assert [(j.job_id, j.state) for j in restored] == [("a", "queued"), ("b", "queued")]
    assert restored[1].config_overrides == "iterations: 5" and restored[0].robot == "robot1"
    (tmp_path / "queue.json").write_text("[]")
    try:
        JobQueue(tmp_path / "queue.json").load()
        raise AssertionError("a file that is not a queue must not load")
    except Exception as exc:
        assert "is not a training queue" in str(exc)


def test_goals_back_to_back_run_in_order_and_a_queued_goal_can_be_cancelled(ros_node, tmp_path):
    from m3_msgs.action import Train

    scans = tmp_path / "scans"
    shutil.copytree(demo_scene("tiny"), scans / "tiny", ignore=shutil.ignore_patterns("bag", "previews"))
    events = []   # ordered: ("feedback", name, stage, position) and ("result", name, status)
    with node_process("m3_trainer", "--ros-args", "-p", f"scene_roots:=['{scans}']", "-p",
                      f"output_root:={tmp_path / 'memories'}", "-p", f"storage_root:={tmp_path / 'storage'}"):
        client = ActionClient(ros_node, Train, "m3/train")
        assert client.wait_for_server(timeout_sec=30)
        handles = {}
        for name, iterations in (("first", 40), ("second", 2), ("third", 2)):
            goal = Train.Goal(scene_dir=str(scans / "tiny"), output=f"{name}.pt",
                              config_overrides=f"{{iterations: {iterations}, log_every: 1}}")
            future = client.send_goal_async(goal, feedback_callback=lambda m, n=name: events.append(
                ("feedback", n, m.feedback.stage, m.feedback.queue_position)))
            rclpy.spin_until_future_complete(ros_node, future, timeout_sec=20)
            handles[name] = future.result()
            assert handles[name].accepted
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or all(
            any(e[1] == n for e in events) for n in handles), timeout=30), events
        first_of = {n: next(e for e in events if e[1] == n) for n in handles}
        assert first_of["second"] == ("feedback", "second", "queued", 1), events
        assert first_of["third"] == ("feedback", "third", "queued", 2), events

        cancel = handles["third"].cancel_goal_async()
        rclpy.spin_until_future_complete(ros_node, cancel, timeout_sec=20)
        results = {}
        for name, handle in handles.items():
            future = handle.get_result_async()
            future.add_done_callback(lambda f, n=name: events.append(("result", n, f.result().status)))
            results[name] = future
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or all(f.done() for f in
                                                                                 results.values()), timeout=300)
    third = results["third"].result()
    assert third.status == GoalStatus.STATUS_CANCELED and "never ran" in third.result.message
    for name in ("first", "second"):
        answer = results[name].result()
        assert answer.status == GoalStatus.STATUS_SUCCEEDED and answer.result.success, answer.result.message
        assert (tmp_path / "memories" / f"{name}.pt").is_file()
    assert not (tmp_path / "memories" / "third.pt").exists()
    # FIFO: the short second goal ran after the long first one, not beside it
    memories = tmp_path / "memories"
    assert (memories / "first.pt").stat().st_mtime_ns < (memories / "second.pt").stat().st_mtime_ns
    assert {e[3] for e in events if e[:2] == ("feedback", "second") and e[2] == "queued"} <= {0, 1}
    assert JobQueue(tmp_path / "storage" / "queue.json").load() == []


def test_scan_goals_plan_into_the_storage_layout_and_the_device_parameter_is_a_default(tmp_path):
    from m3_msgs.action import Train

    from m3_memory.core.errors import M3Error
    from m3_memory.core.pipeline import DEFAULT_TRAIN_CONFIG
    from m3_memory.core.storage import Storage
    from m3_memory.ros.trainer import plan_goal

    storage = Storage(tmp_path / "storage")
    goal = Train.Goal(robot="robot1", scan_id="/robot_disk/scans/scan_20260101_120000_000000")  # a status's path
    job = plan_goal(goal, [], tmp_path, DEFAULT_TRAIN_CONFIG, storage, device="cpu")
    assert job.scene_dir == storage.root / "robot1" / "scans" / "scan_20260101_120000_000000"
    assert job.output == storage.root / "robot1" / "memories" / "scan_20260101_120000_000000.pt"
    assert (job.robot, job.scan_id, job.config.device) == ("robot1", "scan_20260101_120000_000000", "cpu")
    goal.config_overrides = "device: auto"      # the goal's own setting wins over the node's parameter
    assert plan_goal(goal, [], tmp_path, DEFAULT_TRAIN_CONFIG, storage, device="cpu").config.device == "auto"
    for bad, message in ((Train.Goal(robot="a/b", scan_id="s"), "one namespace level"),
                         (Train.Goal(scan_id="s", output="../../x.pt"), "outside the configured roots"),
                         (Train.Goal(scan_id=".."), "scan id")):
        try:
            plan_goal(bad, [], tmp_path, DEFAULT_TRAIN_CONFIG, storage)
            raise AssertionError(f"{bad} was planned")
        except M3Error as exc:
            assert message in str(exc), exc
