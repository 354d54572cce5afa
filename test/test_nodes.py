"""The trainer node process answers over DDS: a goal it cannot run is accepted, then aborted with the reason."""
import rclpy
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient

from conftest import node_process


def train_result(node, goal):
    """The (status, result) the trainer ends `goal` with."""
    from m3_msgs.action import Train

    client = ActionClient(node, Train, "m3/train")
    assert client.wait_for_server(timeout_sec=20)
    future = client.send_goal_async(goal)
    rclpy.spin_until_future_complete(node, future, timeout_sec=20)
    handle = future.result()
    assert handle.accepted
    future = handle.get_result_async()
    rclpy.spin_until_future_complete(node, future, timeout_sec=20)
    return future.result().status, future.result().result


def test_trainer_aborts_goals_it_cannot_run_with_the_reason(ros_node, tmp_path):
    from m3_msgs.action import Train

    with node_process("m3_trainer", "--ros-args", "-p", f"scene_roots:=['{tmp_path}']",
                      "-p", f"storage_root:={tmp_path / 'storage'}"):
        (tmp_path / "scene.json").write_text("{}")
        for goal, reason in ((Train.Goal(scene_dir=""), "scene_dir is empty"),
                             (Train.Goal(scene_dir="/"), "outside the configured roots"),
                             (Train.Goal(scene_dir=str(tmp_path / "missing")), "no scene.json"),
                             (Train.Goal(scene_dir=str(tmp_path), config_overrides="[1, 2]"), "YAML mapping")):
            status, result = train_result(ros_node, goal)
            assert status == GoalStatus.STATUS_ABORTED and not result.success and reason in result.message, result
