"""Issue #17's barrage against a real memory server process over DDS: each bad input gets a reason (or is ignored with
a log line), the process stays alive and the next good request is answered; memory files cannot run code and only
memories under the server's memory root are loaded."""
import pickle
import shutil

import numpy as np
import pytest
import rclpy
import torch
from geometry_msgs.msg import Pose, TransformStamped
from m3_msgs.msg import MemoryStatus
from m3_msgs.srv import Locate
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import String
from tf2_msgs.msg import TFMessage

from conftest import node_process, wait_for
from m3_memory.core.pipeline import load_train_config, scene_features
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import train
from m3_memory.ros.conversions import matrix_to_pose
from m3_memory.ros.qos import LATCHED, TF_QOS
from m3_memory.sim import demo_scene


class WritesAFile:
    """A pickle payload: unpickling it would create `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def memories(tmp_path_factory):
    """A memory root with a 30-iteration tiny memory, and the scene's first camera pose."""
    root = tmp_path_factory.mktemp("memories")
    scene_dir = tmp_path_factory.mktemp("scan") / "tiny"
    shutil.copytree(demo_scene("tiny"), scene_dir, ignore=shutil.ignore_patterns("bag", "previews"))
    scene = Scene.load(scene_dir)
    train(scene, scene_features(scene, scene_dir, ["m3-tinyvlm"]), load_train_config(None, {"iterations": 30}),
          root / "good.pt")
    return root, scene.c2w[0]


def test_bad_inputs_get_reasons_and_the_server_keeps_answering(memories, ros_node, tmp_path):
    root, c2w = memories
    client = ros_node.create_client(Locate, "/m3/locate")
    announce = ros_node.create_publisher(String, "/m3/checkpoint", LATCHED)
    tf = ros_node.create_publisher(TFMessage, "/tf", TF_QOS)
    info = ros_node.create_publisher(CameraInfo, "/camera/color/camera_info", 1)
    statuses = []
    ros_node.create_subscription(MemoryStatus, "/m3/memory_status", statuses.append, LATCHED)

    def ask(query: str, **fields) -> Locate.Response:
        future = client.call_async(Locate.Request(query=query, **fields))
        rclpy.spin_until_future_complete(ros_node, future, timeout_sec=60)
        return future.result()

    def status_after(count: int) -> str:
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or len(statuses) > count, 60)
        return statuses[-1].message

    good_view = matrix_to_pose(c2w)
    with node_process("m3_memory_server", "--ros-args", "-p", f"checkpoint:={root / 'good.pt'}",
                      "-p", f"memory_root:={root}", "-p", "min_relevancy:=0.0") as server:
        assert client.wait_for_service(timeout_sec=60)
        assert wait_for(lambda: ask("yellow bath duck", view=good_view).success, 90)

        def still_serving():
            assert server.poll() is None
            answer = ask("yellow bath duck", view=good_view)
            assert answer.success, answer.message

        # Views that are no pose.
        for values, why in (((1e308, 1e308, 0.0, 0.0), None), ((0.0, 0.0, 0.0, 1.0, float("nan")), "not finite"),
                            ((float("inf"), 0.0, 0.0, 1.0), "not finite")):
            pose = Pose()
            pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = values[:4]
            pose.position.x = values[4] if len(values) > 4 else 0.0
            answer = ask("yellow bath duck", view=pose)
            assert answer.success or (why and why in answer.message), answer.message
            still_serving()
        # Queries that mean nothing.
        for query, why in (("🦆", "no letters"), ("\u200b", "invisible"), ("duck\u202e", "invisible"),
                           ("x" * 300, "limit is 256")):
            answer = ask(query)
            assert not answer.success and why in answer.message, (query, answer.message)
        still_serving()

        # A camera pose of 1e308 from TF, then a locate from the camera: a reason, not a crash.
        link = TransformStamped()
        link.header.frame_id, link.child_frame_id = "world", "camera_color_optical_frame"
        link.header.stamp = ros_node.get_clock().now().to_msg()
        link.transform.rotation.x, link.transform.rotation.w = 1e308, 1.0
        assert wait_for(lambda: tf.get_subscription_count() > 0, 20)
        tf.publish(TFMessage(transforms=[link]))
        rclpy.spin_once(ros_node, timeout_sec=0.5)
        answer = ask("yellow bath duck")
        assert server.poll() is None and (answer.success or answer.message), answer.message
        # CameraInfo of 0×0: ignored, the next locate with a view uses the memory's camera.
        assert wait_for(lambda: info.get_subscription_count() > 0, 20)
        info.publish(CameraInfo(width=0, height=0))
        rclpy.spin_once(ros_node, timeout_sec=0.5)
        still_serving()

        # Announced files that must not be loaded; the served memory stays.
        payload = tmp_path / "pwned"
        with (root / "evil.pt").open("wb") as handle:
            pickle.dump({"format": "m3-memory/1", "x": WritesAFile(payload)}, handle)
        torch.save({"format": "m3-memory/1"}, root / "format_only.pt")
        outside = tmp_path / "outside.pt"
        shutil.copy(root / "good.pt", outside)
        (root / "link.pt").symlink_to(outside)
        for name, why in ((str(root / "evil.pt"), "pickle"), (str(root / "format_only.pt"), "pickle"),
                          (str(outside), "outside the configured roots"), (str(root / "link.pt"), "outside"),
                          (str(root / "missing.pt"), "no memory checkpoint")):
            seen = len(statuses)
            announce.publish(String(data=name))
            assert why in status_after(seen), (name, statuses[-1].message)
            still_serving()
        assert not payload.exists()                       # the pickle's code never ran
        assert statuses[-1].checkpoint == str(root / "good.pt")
        assert np.isfinite(ask("yellow bath duck").score)
