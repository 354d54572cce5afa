"""The synthetic tabletop scene: scene directory, ground truth, and the rosbag2 bag read back with rosbags."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore

from m3_memory.core.geometry import interpolate_pose_at, pose_from_xyzw
from m3_memory.core.scene import Scene
from m3_memory.sim import cli

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
EXPECTED_TOPICS = {
    "/camera/color/image_raw": "sensor_msgs/msg/Image",
    "/camera/aligned_depth_to_color/image_raw": "sensor_msgs/msg/Image",
    "/camera/color/camera_info": "sensor_msgs/msg/CameraInfo",
    "/tf": "tf2_msgs/msg/TFMessage",
    "/tf_static": "tf2_msgs/msg/TFMessage",
    "/odom": "nav_msgs/msg/Odometry",
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny scene, generated once through the command-line entry point."""
    out = tmp_path_factory.mktemp("sim") / "tiny"
    assert cli.main(["--out", str(out), "--size", "tiny", "--seed", "0"]) == 0
    return out


def _stamp(header) -> int:
    return header.stamp.sec * 10**9 + header.stamp.nanosec


@pytest.fixture(scope="session")
def bag(tiny) -> dict:
    """Every message of the bag, deserialised: topic -> list of (bag time ns, message)."""
    messages = defaultdict(list)
    with Reader(tiny / "bag") as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        digests = {c.topic: c.digest for c in reader.connections}
        for connection, timestamp, raw in reader.messages():
            messages[connection.topic].append((timestamp, TYPESTORE.deserialize_cdr(raw, connection.msgtype), raw))
    storage = yaml.safe_load((tiny / "bag" / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    return {"types": types, "digests": digests, "messages": messages, "storage": storage["storage_identifier"]}


def test_scene_directory_and_ground_truth_files(tiny):
    scene = Scene.load(tiny)
    assert scene.world_frame == "world" and len(scene) >= 5
    assert scene.images().shape == (len(scene), 120, 160, 3) and scene.depths().shape == (len(scene), 120, 160)
    objects = json.loads((tiny / "objects.json").read_text())["objects"]
    assert any("yellow bath duck" in obj["phrases"] for obj in objects)
    for obj in objects:
        lo, hi, centre = (np.array(obj[k]) for k in ("bbox_min", "bbox_max", "center"))
        assert np.all(hi > lo) and np.allclose(centre, (lo + hi) / 2)
        assert abs(lo[2] - 0.626) < 1e-6  # standing on the table top
    labels_seen = set()
    for frame in scene.frames:
        mask = np.asarray(Image.open(tiny / "masks" / f"{frame.frame_id}.png"))
        assert mask.shape == (120, 160) and mask.max() <= len(objects)
        labels_seen |= set(np.unique(mask).tolist())
    assert labels_seen == set(range(len(objects) + 1))  # every object is visible somewhere
    previews = sorted((tiny / "previews").glob("*.png"))
    assert len(previews) >= 2 and Image.open(previews[0]).size == (320, 240)


def test_depth_back_projection_lands_on_ground_truth(tiny):
    """Masked depth pixels lifted with K and the camera pose fall inside each object's box; the ball's centre fits."""
    scene = Scene.load(tiny)
    objects = json.loads((tiny / "objects.json").read_text())["objects"]
    points = defaultdict(list)
    for i, frame in enumerate(scene.frames):
        mask = np.asarray(Image.open(tiny / "masks" / f"{frame.frame_id}.png"))
        depth = scene.depth(i)
        v, u = np.nonzero((mask > 0) & (depth > 0))
        z = depth[v, u].astype(np.float64)
        cam = np.stack([(u - frame.K[0, 2]) / frame.K[0, 0] * z, (v - frame.K[1, 2]) / frame.K[1, 1] * z, z], 1)
        world = cam @ frame.c2w[:3, :3].T + frame.c2w[:3, 3]
        footprint = z / frame.K[0, 0]  # metres per pixel at that depth
        for label in np.unique(mask[v, u]):
            points[int(label)].append(np.c_[world, footprint][mask[v, u] == label])
    for obj in objects:
        xyz, footprint = np.split(np.concatenate(points[obj["index"]]), [3], axis=1)
        lo, hi = np.array(obj["bbox_min"]), np.array(obj["bbox_max"])
        outside = np.linalg.norm(np.maximum(lo - xyz, 0) + np.maximum(xyz - hi, 0), axis=1)
        # Depth is quantised to 1 mm; a tenth of a pixel's footprint allows for silhouette pixels on grazing faces
        # (a half-pixel convention error between depth, mask and K would exceed it).
        assert np.all(outside < 0.0015 + 0.1 * footprint[:, 0]), obj["name"]
        assert np.median(outside) < 0.0005, obj["name"]
        assert np.ptp(xyz[:, 2]) > 0.7 * (hi[2] - lo[2]), obj["name"]  # the points cover the object's height
    ball = next(obj for obj in objects if obj["name"] == "yellow ball")
    xyz = np.concatenate(points[ball["index"]])[:, :3]
    # Linear least-squares sphere: |x|^2 = 2 c.x + (r^2 - |c|^2).
    solution, *_ = np.linalg.lstsq(np.c_[2 * xyz, np.ones(len(xyz))], (xyz**2).sum(1), rcond=None)
    centre = solution[:3]
    radius = np.sqrt(solution[3] + centre @ centre)
    assert np.linalg.norm(centre - np.array(ball["center"])) < 0.005
    assert abs(radius - 0.04) < 0.004  # the rendered sphere is a tessellation slightly inside the true one


def test_bag_topics_types_counts_and_timing(tiny, bag):
    assert bag["storage"] == "mcap"
    assert bag["types"] == EXPECTED_TOPICS
    messages = bag["messages"]
    trajectory = json.loads((tiny / "camera_trajectory.json").read_text())
    n_frames = len(trajectory["stamps_ns"])
    assert len(trajectory["dropped_stamps_ns"]) >= 1
    for topic in ("/camera/color/image_raw", "/camera/aligned_depth_to_color/image_raw", "/camera/color/camera_info"):
        assert len(messages[topic]) == n_frames
        assert [_stamp(m.header) for _, m, _ in messages[topic]] == trajectory["stamps_ns"]
        assert all(t > _stamp(m.header) for t, m, _ in messages[topic])  # received after capture
    color_dt = np.diff(trajectory["stamps_ns"]) * 1e-9
    assert abs(np.median(color_dt) - 1 / 30) < 0.003 and color_dt.max() > 1.5 / 30  # 30 Hz with a dropped frame
    odom = messages["/odom"]
    assert abs(np.median(np.diff([_stamp(m.header) for _, m, _ in odom])) * 1e-9 - 0.1) < 0.005
    assert all(m.header.frame_id == "world" and m.child_frame_id == "lidar" for _, m, _ in odom)
    arm = [m.transforms[0] for _, m, _ in messages["/tf"] if m.transforms[0].child_frame_id == "ee_link"]
    assert abs(np.median(np.diff([_stamp(t.header) for t in arm])) * 1e-9 - 0.01) < 0.001
    assert len(messages["/tf"]) == len(arm) + len(odom)  # odometry is also on /tf as world -> lidar
    (static,) = messages["/tf_static"]
    assert len(static[1].transforms) == 3
    bag_times = [t for topic in messages.values() for t, _, _ in topic]
    assert min(bag_times) == static[0]  # static transforms come first
    image = messages["/camera/color/image_raw"][0][1]
    depth = messages["/camera/aligned_depth_to_color/image_raw"][0][1]
    assert (image.encoding, image.width, image.height, image.step) == ("rgb8", 160, 120, 480)
    assert (depth.encoding, depth.step) == ("16UC1", 320)


def test_bag_images_match_scene_keyframes(tiny, bag):
    scene = Scene.load(tiny)
    color = {_stamp(m.header): m for _, m, _ in bag["messages"]["/camera/color/image_raw"]}
    depth = {_stamp(m.header): m for _, m, _ in bag["messages"]["/camera/aligned_depth_to_color/image_raw"]}
    info = {_stamp(m.header): m for _, m, _ in bag["messages"]["/camera/color/camera_info"]}
    for i, frame in enumerate(scene.frames):
        np.testing.assert_array_equal(color[frame.timestamp_ns].data.reshape(120, 160, 3), scene.image(i))
        depth_mm = depth[frame.timestamp_ns].data.view(np.uint16).reshape(120, 160)
        np.testing.assert_allclose(depth_mm * 1e-3, scene.depth(i), atol=1e-6)
        np.testing.assert_allclose(info[frame.timestamp_ns].k.reshape(3, 3), frame.K)


def _transform(msg) -> np.ndarray:
    t, q = msg.transform.translation, msg.transform.rotation
    return pose_from_xyzw([q.x, q.y, q.z, q.w], [t.x, t.y, t.z])


def test_tf_chain_reproduces_camera_poses(tiny, bag):
    """Compose world -> ... -> camera from /tf (interpolated at the image stamp) and /tf_static, as a consumer must."""
    dynamic, static, parent_of = defaultdict(list), {}, {}
    for _, msg, _ in bag["messages"]["/tf"]:
        for tf in msg.transforms:
            dynamic[tf.child_frame_id].append((_stamp(tf.header), _transform(tf)))
            parent_of[tf.child_frame_id] = tf.header.frame_id
    for tf in bag["messages"]["/tf_static"][0][1].transforms:
        static[tf.child_frame_id] = _transform(tf)
        parent_of[tf.child_frame_id] = tf.header.frame_id
    chain = ["camera_color_optical_frame"]
    while chain[-1] in parent_of:
        chain.append(parent_of[chain[-1]])
    assert chain[::-1] == ["world", "lidar", "base_link", "arm_base", "ee_link", "camera_color_optical_frame"]
    series = {
        child: (np.array([s for s, _ in samples]), np.stack([p for _, p in samples]))
        for child, samples in dynamic.items()
    }

    def lookup(stamp: int) -> np.ndarray:
        pose = np.eye(4)
        for child in chain[-2::-1]:  # from the world's child down to the camera
            pose = pose @ (static[child] if child in static else interpolate_pose_at(*series[child], stamp))
        return pose

    scene = Scene.load(tiny)
    for frame in scene.frames:
        np.testing.assert_allclose(lookup(frame.timestamp_ns), frame.c2w, atol=1e-6, rtol=0)
    trajectory = json.loads((tiny / "camera_trajectory.json").read_text())
    for stamp, c2w in zip(trajectory["stamps_ns"][::7], trajectory["c2w"][::7], strict=True):
        np.testing.assert_allclose(lookup(stamp), np.array(c2w), atol=1e-6, rtol=0)
    # Both dynamic links really move: neither odometry nor the arm alone explains the camera motion.
    for child, min_travel in (("lidar", 0.3), ("ee_link", 0.03)):
        _, poses = series[child]
        assert np.linalg.norm(poses[:, :3, 3] - poses[0, :3, 3], axis=1).max() > min_travel, child


def test_bag_types_match_ros2_kilted(bag):
    """Type hashes equal those of the installed Kilted interface packages; rclpy decodes the bytes."""
    share = Path(sys.prefix) / "share"
    compared = 0
    for topic, msgtype in EXPECTED_TOPICS.items():
        package, _, name = msgtype.split("/")
        description = share / package / "msg" / f"{name}.json"
        if description.exists():
            hashes = {h["type_name"]: h["hash_string"] for h in json.loads(description.read_text())["type_hashes"]}
            assert bag["digests"][topic] == hashes[msgtype] == TYPESTORE.hash_rihs01(msgtype)
            compared += 1
    if compared == 0:
        pytest.skip("no ROS 2 interface packages installed to compare type hashes with")
    serialization = pytest.importorskip("rclpy.serialization")
    sensor_msgs = pytest.importorskip("sensor_msgs.msg")
    nav_msgs = pytest.importorskip("nav_msgs.msg")
    raw_image = bag["messages"]["/camera/aligned_depth_to_color/image_raw"][0][2]
    image = serialization.deserialize_message(bytes(raw_image), sensor_msgs.Image)
    assert image.encoding == "16UC1" and image.height == 120
    odom = serialization.deserialize_message(bytes(bag["messages"]["/odom"][0][2]), nav_msgs.Odometry)
    assert odom.child_frame_id == "lidar"
    info = serialization.deserialize_message(
        bytes(bag["messages"]["/camera/color/camera_info"][0][2]), sensor_msgs.CameraInfo
    )
    assert info.distortion_model == "plumb_bob" and len(info.k) == 9


def test_cache_is_deterministic_and_atomic(tiny, tmp_path, monkeypatch):
    from m3_memory.sim import demo_scene

    monkeypatch.setenv("M3_CACHE_DIR", str(tmp_path))

    def interrupt(line: str) -> None:
        if line.startswith("writing rosbag2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo_scene("tiny", seed=0, progress=interrupt)
    assert list((tmp_path / "demo_scene").iterdir()) == []  # no half scene left behind

    path = demo_scene("tiny", seed=0)
    assert path.parent == tmp_path / "demo_scene" and path.name.startswith("tiny-seed0-v")
    for name in ("frames.jsonl", "objects.json", "camera_trajectory.json", "rgb/000000.png", "depth/000000.png"):
        assert (path / name).read_bytes() == (tiny / name).read_bytes(), name  # same seed, same scene
    stamp = (path / "frames.jsonl").stat().st_mtime_ns
    assert demo_scene("tiny", seed=0) == path and (path / "frames.jsonl").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "demo_scene").iterdir()] == [path.name]


def test_out_dir_and_size_errors(tiny):
    from m3_memory.sim import demo_scene

    with pytest.raises(FileExistsError, match="not empty"):
        demo_scene("tiny", out=tiny)
    with pytest.raises(ValueError, match="unknown scene size"):
        demo_scene("huge", out=tiny.parent / "huge")


def test_cli_registers_demo_scene_subcommand(tmp_path):
    parser = argparse.ArgumentParser(prog="m3")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo-scene", "--out", str(tmp_path / "x"), "--size", "tiny", "--seed", "3"])
    assert (args.command, args.size, args.seed, args.out, args.func) == (
        "demo-scene",
        "tiny",
        3,
        tmp_path / "x",
        cli.run,
    )


def test_halves_scene_hides_the_duck_from_its_first_half():
    """The `halves` scan (issue #15's split test): objects stand at their fixed places; no pixel of the duck in any
    keyframe of the first half (time order), well seen in the second; every other object seen in the first half."""
    from m3_memory.sim import SIZES, demo_scene

    root = demo_scene("halves")
    scene = Scene.load(root)
    objects = json.loads((root / "objects.json").read_text())["objects"]
    for obj in objects:
        np.testing.assert_allclose(obj["center"][:2], SIZES["halves"].places[obj["name"]], atol=1e-9)
    stamps = [frame.timestamp_ns for frame in scene.frames]
    assert stamps == sorted(stamps)
    masks = [np.asarray(Image.open(root / "masks" / f"{frame.frame_id}.png")) for frame in scene.frames]
    pixels = np.array([[int((mask == obj["index"]).sum()) for obj in objects] for mask in masks])   # [n, objects]
    half, duck = len(scene) // 2, [obj["name"] for obj in objects].index("yellow bath duck")
    assert not pixels[:half, duck].any()
    assert (pixels[half:, duck] > 100).sum() >= 3
    others = np.delete(pixels[:half], duck, axis=1)
    assert ((others >= 30).sum(axis=0) >= half // 2).all(), others
