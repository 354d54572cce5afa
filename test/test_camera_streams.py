"""Real camera streams (issue #13 part 4) over real DDS: a real recorder process under namespace robot1 takes
best-effort compressed colour (PNG, JPEG) and compressedDepth streams replayed by `m3 play --namespace robot1`, and a
reliable raw stream without losing a frame; every kept frame is checked against the bag's uncompressed original."""
import re
import threading
import time

import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import Reader
from std_srvs.srv import Trigger

from conftest import node_process, run_command
from m3_memory.core.scene import Scene
from m3_memory.ros.graph_client import call_service
from m3_memory.sim import demo_scene
from m3_memory.sim.bag import TOPIC_COLOR, TOPIC_DEPTH, TYPESTORE, compress_bag

NS = "robot1"


@pytest.fixture(scope="module")
def tiny_bag():
    """The tiny demo bag and its raw frames by stamp: `(bag, {stamp_ns: (rgb [H, W, 3] uint8, depth_mm [H, W])})`."""
    bag = demo_scene("tiny") / "bag"
    frames = {}
    with Reader(bag) as reader:
        for connection, _, raw in reader.messages():
            if connection.topic in (TOPIC_COLOR, TOPIC_DEPTH):
                msg = TYPESTORE.deserialize_cdr(raw, connection.msgtype)
                stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
                shape = (msg.height, msg.width, 3) if connection.topic == TOPIC_COLOR else (msg.height, msg.width)
                pixels = np.frombuffer(msg.data, np.uint8 if connection.topic == TOPIC_COLOR else np.uint16)
                frames.setdefault(stamp, [None, None])[connection.topic == TOPIC_DEPTH] = pixels.reshape(shape)
    return bag, {stamp: tuple(pair) for stamp, pair in frames.items()}


def decoded_jpeg(bag) -> dict:
    """stamp → RGB of each compressed colour frame of `bag`, decoded here with OpenCV (the reference)."""
    import cv2

    frames = {}
    with Reader(bag) as reader:
        for connection, _, raw in reader.messages():
            if connection.topic == TOPIC_COLOR + "/compressed":
                msg = TYPESTORE.deserialize_cdr(raw, connection.msgtype)
                assert msg.format == "rgb8; jpeg compressed bgr8"
                bgr = cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_COLOR)
                frames[msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec] = bgr[..., ::-1]
    return frames


def trigger(name: str) -> Trigger.Response:
    return call_service(Trigger, name, Trigger.Request(), timeout=30)


def recorder(root, *params: str):
    """A recorder in namespace robot1 that keeps every posable frame (no keyframe selection)."""
    args = [f"output_root:={root}", "min_translation_m:=0.0", "min_rotation_deg:=0.0", "blur_ratio:=0.0",
            "wait_seconds:=1.0", *params]
    return node_process("m3_recorder", "--ros-args", "-r", f"__ns:=/{NS}", *[a for p in args for a in ("-p", p)])


def status_after_stop(node):
    import rclpy
    from m3_msgs.msg import RecorderStatus

    latest = []
    qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
    subscription = node.create_subscription(RecorderStatus, f"/{NS}/m3/recorder/status", latest.append, qos)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (latest and not latest[-1].recording):
        rclpy.spin_once(node, timeout_sec=0.2)
    node.destroy_subscription(subscription)
    return latest[-1]


def record(node, bag, wait_for: str, *play_args: str):
    """Start a scan, `m3 play` the bag under robot1, stop: (scene, stop answer, status)."""
    started = trigger(f"/{NS}/m3/recorder/start")
    assert started.success, started.message
    played = run_command("m3", "play", str(bag), "--namespace", NS, "--wait-for", wait_for, *play_args, timeout=120)
    assert played.returncode == 0, played.stdout + played.stderr
    time.sleep(1.5)  # the last frames' wait for transforms
    stopped = trigger(f"/{NS}/m3/recorder/stop")
    assert stopped.success, stopped.message
    return Scene.load(started.message), stopped.message, status_after_stop(node)


def kept_all_without_rejection(message: str, status, published: int) -> None:
    """Every frame the recorder received was kept; frames it did not receive are only `dropped` (never a rejection)."""
    assert "rejected: none" in message, message
    assert status.frames_kept == status.frames_seen > 0 and status.frames_rejected == 0, status
    assert status.frames_pending == 0 and status.frames_seen <= published, status


@pytest.mark.parametrize("colour", ["png", "jpeg"])
def test_best_effort_compressed_streams_under_a_namespace(tmp_path, ros_node, tiny_bag, colour):
    bag, originals = tiny_bag
    compressed = tmp_path / "bag"
    compress_bag(bag, compressed, colour, camera_reliability="best_effort")
    with recorder(tmp_path / "scans", "color_transport:=compressed", "depth_transport:=compressedDepth") as process:
        scene, message, status = record(ros_node, compressed, f"/{NS}/camera/color/image_raw/compressed")
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert f"/{NS}/camera/color/image_raw/compressed: its publishers offer best_effort" in output, output
    assert f"/{NS}/camera/aligned_depth_to_color/image_raw/compressedDepth: its publishers offer best_effort" in output
    kept_all_without_rejection(message, status, len(originals))
    jpeg_frames = decoded_jpeg(compressed) if colour == "jpeg" else {}
    # on an idle loopback best effort loses nothing; the recorder must keep at least most of the 30 frames
    assert len(scene) >= 0.8 * len(originals), message
    for i, stamp in enumerate(scene.timestamps_ns):
        rgb, depth_mm = originals[int(stamp)]
        np.testing.assert_allclose(scene.depth(i), depth_mm * np.float32(0.001), atol=1e-6)  # PNG depth: exact
        image = scene.image(i)
        if colour == "png":
            assert np.array_equal(image, rgb)
        else:  # JPEG is lossy: what the file decodes to, and close to the original (a channel swap would be far)
            assert np.array_equal(image, jpeg_frames[int(stamp)])
            mse = np.mean((image.astype(float) - rgb) ** 2)
            assert 10 * np.log10(255**2 / mse) > 30, mse


def test_reliable_raw_stream_is_lossless_under_a_namespace(tmp_path, ros_node, tiny_bag):
    bag, originals = tiny_bag
    with recorder(tmp_path / "scans") as process:
        scene, message, status = record(ros_node, bag, f"/{NS}/camera/color/image_raw")
        process.terminate()
        process.communicate(timeout=20)
    kept_all_without_rejection(message, status, len(originals))
    assert status.frames_seen == len(originals), message  # reliable: every published frame arrived
    assert status.frames_dropped == int(re.search(r"dropped (\d+)", message).group(1)) >= 1  # the bag's own gap
    for i, stamp in enumerate(scene.timestamps_ns):
        rgb, depth_mm = originals[int(stamp)]
        assert np.array_equal(scene.image(i), rgb)
        np.testing.assert_allclose(scene.depth(i), depth_mm * np.float32(0.001), atol=1e-6)


def test_play_refuses_a_missing_bag_without_a_traceback(tmp_path):
    result = run_command("m3", "play", str(tmp_path / "nothing"), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"no rosbag2 bag at {tmp_path / 'nothing'}" in result.stderr


def test_play_clock_publishes_the_bag_time(ros_node, tiny_bag):
    import rclpy
    from rosgraph_msgs.msg import Clock

    from m3_memory.ros.bag_play import play

    bag, _ = tiny_bag
    ticks = []
    ros_node.create_subscription(Clock, "/clock", ticks.append,
                                 QoSProfile(depth=200, reliability=ReliabilityPolicy.BEST_EFFORT))
    player = threading.Thread(target=play, args=(str(bag),), kwargs=dict(namespace=NS, clock_hz=40.0, log=print))
    player.start()
    while player.is_alive():
        rclpy.spin_once(ros_node, timeout_sec=0.05)
    for _ in range(10):
        rclpy.spin_once(ros_node, timeout_sec=0.05)
    stamps = [tick.clock.sec * 10**9 + tick.clock.nanosec for tick in ticks]
    with Reader(bag) as reader:
        start, end = reader.start_time, reader.end_time
    assert len(stamps) >= 0.5 * 40 * (end - start) * 1e-9, len(stamps)  # about 40 Hz over the 1.3 s bag
    assert stamps == sorted(stamps) and start <= stamps[0] and stamps[-1] <= end, (start, stamps[:3], stamps[-3:], end)
    assert stamps[-1] - stamps[0] > 0.8 * (end - start)
