"""The trainer node process answers over DDS, refusing goals it cannot run."""
import rclpy
from rclpy.action import ActionClient

from conftest import node_process


def send_train_goal(node, goal):
    from m3_msgs.action import Train

    client = ActionClient(node, Train, "m3/train")
    assert client.wait_for_server(timeout_sec=20)
    future = client.send_goal_async(goal)
    rclpy.spin_until_future_complete(node, future, timeout_sec=20)
    return future.result()


def test_trainer_rejects_goals_it_cannot_run(ros_node, tmp_path):
    from m3_msgs.action import Train

    with node_process("m3_trainer"):
        assert not send_train_goal(ros_node, Train.Goal(scene_dir="")).accepted
        assert not send_train_goal(ros_node, Train.Goal(scene_dir=str(tmp_path / "missing"))).accepted
        (tmp_path / "scene.json").write_text("{}")
        assert not send_train_goal(ros_node, Train.Goal(scene_dir=str(tmp_path), config_overrides="[1, 2]")).accepted
