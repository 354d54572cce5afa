"""Trainer and recorder node processes answer over DDS, refusing bad requests with a reason."""
import rclpy
import pytest
from rclpy.action import ActionClient
from std_srvs.srv import Trigger

from conftest import node_process
from m3_memory.ros.graph_client import call_service


@pytest.fixture
def ros_node():
    rclpy.init()
    node = rclpy.create_node("m3_test_client")
    yield node
    node.destroy_node()
    rclpy.try_shutdown()


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


def test_recorder_start_stop_are_checked():
    try:
        with node_process("m3_recorder"):
            stop_first = call_service(Trigger, "/m3/recorder/stop", Trigger.Request(), timeout=20)
            assert not stop_first.success and "not recording" in stop_first.message
            assert call_service(Trigger, "/m3/recorder/start", Trigger.Request(), timeout=20).success
            again = call_service(Trigger, "/m3/recorder/start", Trigger.Request(), timeout=20)
            assert not again.success and "already recording" in again.message
            stopped = call_service(Trigger, "/m3/recorder/stop", Trigger.Request(), timeout=20)
            assert stopped.success and "stopped after 0 frames" in stopped.message
    finally:
        rclpy.try_shutdown()
