"""The recorder node over real DDS: a replayed bag becomes a posed scene; bad frames are counted, not crashed on."""
import json
import signal
import threading
import time

import numpy as np
import pytest
import rclpy
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage
from geometry_msgs.msg import TransformStamped

from conftest import node_process, wait_for
from m3_memory.core.scene import Scene
from m3_memory.ros.bag_play import play
from m3_memory.ros.graph_client import call_service
from m3_memory.sim import demo_scene

COLOR = "/camera/color/image_raw"


@pytest.fixture(scope="module")
def tiny_scene():
    return demo_scene("tiny")


def trigger(name: str) -> Trigger.Response:
    return call_service(Trigger, name, Trigger.Request(), timeout=20)


@pytest.fixture
def recorder(tmp_path):
    with node_process("m3_recorder", "--ros-args", "-p", f"output_root:={tmp_path}", "-p", "wait_seconds:=0.3") as proc:
        yield proc
    rclpy.try_shutdown()


def test_replayed_bag_becomes_a_posed_scene(recorder, tiny_scene):
    started = trigger("/m3/recorder/start")
    assert started.success
    play(str(tiny_scene / "bag"), rate=1.0, wait_for=COLOR, log=lambda _: None)
    time.sleep(0.5)
    stopped = trigger("/m3/recorder/stop")
    assert stopped.success, stopped.message
    scene = Scene.load(started.message)
    assert len(scene) >= 3
    truth = json.loads((tiny_scene / "camera_trajectory.json").read_text())
    stamps, poses = np.asarray(truth["stamps_ns"]), np.asarray(truth["c2w"])
    for frame in scene.frames:
        (index,) = np.flatnonzero(stamps == frame.timestamp_ns)
        np.testing.assert_allclose(frame.c2w, poses[index], atol=1e-6)
    reference = Scene.load(tiny_scene)
    assert scene.images().shape[1:] == reference.images().shape[1:]
    assert scene.depths() is not None and np.nanmax(scene.depths()) > 0
    np.testing.assert_allclose(scene.Ks[0], reference.Ks[0])
    assert "dropped" in stopped.message  # the tiny bag loses at least one camera frame in transport


def _publisher(node, msg_type, topic, latched=False):
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
    return node.create_publisher(msg_type, topic, qos)


def _image(stamp_ns: int, encoding: str, data: np.ndarray) -> Image:
    msg = Image(encoding=encoding, height=data.shape[0], width=data.shape[1], step=data.strides[0])
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    msg.header.frame_id = "camera"
    msg.data = data.tobytes()
    return msg


def test_dropped_out_of_order_and_unsynchronised_frames_are_counted(recorder, ros_node):
    assert trigger("/m3/recorder/start").success
    color = _publisher(ros_node, Image, COLOR)
    depth = _publisher(ros_node, Image, "/camera/aligned_depth_to_color/image_raw")
    info = _publisher(ros_node, CameraInfo, "/camera/color/camera_info")
    tf_static = _publisher(ros_node, TFMessage, "/tf_static", latched=True)
    assert wait_for(lambda: all(p.get_subscription_count() > 0 for p in (color, depth, info, tf_static)), 20)
    link = TransformStamped(child_frame_id="camera")
    link.header.frame_id = "world"
    link.transform.rotation.w = 1.0
    tf_static.publish(TFMessage(transforms=[link]))
    info.publish(CameraInfo(width=8, height=6, k=[5.0, 0, 4, 0, 5.0, 3, 0, 0, 1]))
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    mm = np.full((6, 8), 1000, np.uint16)
    start, period = 1_000 * 10**9, 10**9 // 30
    # frame 3 comes late (a gap in the stream, then out of order), 5 has no depth; the rate is measured
    for k, with_depth in ((0, True), (1, True), (2, True), (4, True), (3, True), (5, False)):
        color.publish(_image(start + k * period, "rgb8", rgb))
        if with_depth:
            depth.publish(_image(start + k * period, "16UC1", mm))
        time.sleep(0.1)
    time.sleep(1.0)
    stopped = trigger("/m3/recorder/stop")
    assert stopped.success
    assert "kept 1 of 6 frames" in stopped.message
    for reason in ("dropped 1", "out_of_order 1", "unsynchronised 1", "no_motion 3"):
        assert reason in stopped.message, stopped.message
    assert recorder.poll() is None


def test_killed_recorder_leaves_a_loadable_scene(recorder, tiny_scene):
    started = trigger("/m3/recorder/start")
    index = started.message + "/frames.jsonl"
    player = threading.Thread(target=play, args=(str(tiny_scene / "bag"),),
                              kwargs={"rate": 0.3, "wait_for": COLOR, "log": lambda _: None}, daemon=True)
    player.start()

    def frames_written():
        try:
            return sum(1 for _ in open(index)) >= 3
        except FileNotFoundError:
            return False

    assert wait_for(frames_written, timeout=30)
    recorder.send_signal(signal.SIGKILL)
    recorder.wait(timeout=10)
    scene = Scene.load(started.message)
    assert len(scene) >= 3
    assert scene.images().shape[0] == len(scene)
    player.join(timeout=30)
