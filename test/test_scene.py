"""Scene directory format and point initialisation (m3_memory.core.scene); COLMAP import: test_colmap.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from m3_memory.core.geometry import backproject_pixels, interpolate_pose_at, look_at_opencv, make_pose
from m3_memory.core.scene import (
    INDEX_FILE,
    POINTS_FILE,
    Scene,
    SceneError,
    SceneMeta,
    ScenePoints,
    SceneWriter,
    init_points_from_colmap,
    init_points_from_depth,
    initial_points,
    write_points,
)

H, W = 12, 16
K = np.array([[20.0, 0.0, 7.5], [0.0, 20.0, 5.5], [0.0, 0.0, 1.0]])


def _meta(**overrides) -> SceneMeta:
    return SceneMeta(width=W, height=H, K=K, world_frame="map", **overrides)


def _pose(i: int) -> np.ndarray:
    return look_at_opencv(np.array([2.0 * np.cos(i), 2.0 * np.sin(i), 1.0 + 0.1 * i]), np.zeros(3))


def _rgb(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _write(root: Path, n: int, depth: bool = True) -> None:
    with SceneWriter(root, _meta()) as writer:
        for i in range(n):
            writer.add_frame(
                f"f{i:03d}",
                _rgb(i),
                _pose(i),
                10**18 + i * 33_333_333,
                depth=np.full((H, W), 0.5 + i, dtype=np.float32) if depth else None,
            )


def test_round_trip(tmp_path):
    _write(tmp_path, 3)
    scene = Scene.load(tmp_path)
    assert len(scene) == 3 and scene.world_frame == "map"
    assert scene.images().shape == (3, H, W, 3) and scene.images().dtype == np.uint8
    np.testing.assert_array_equal(scene.images()[1], _rgb(1))
    depths = scene.depths()
    assert depths.shape == (3, H, W) and depths.dtype == np.float32
    np.testing.assert_allclose(depths[:, 0, 0], [0.5, 1.5, 2.5], atol=5e-4)  # millimetre quantisation
    np.testing.assert_array_equal(scene.c2w[2], _pose(2))  # JSON keeps float64 exactly
    np.testing.assert_array_equal(scene.Ks, np.stack([K] * 3))
    assert scene.timestamps_ns.tolist() == [10**18, 10**18 + 33_333_333, 10**18 + 66_666_666]
    assert [f.frame_id for f in scene.frames] == ["f000", "f001", "f002"]


def test_frames_without_depth_give_none(tmp_path):
    _write(tmp_path, 2, depth=False)
    scene = Scene.load(tmp_path)
    assert scene.depths() is None and scene.depth(0) is None
    with pytest.raises(SceneError, match="no frame has valid depth"):
        init_points_from_depth(scene)


def test_truncated_last_line_is_dropped_and_writer_resumes(tmp_path):
    _write(tmp_path, 3)
    index = tmp_path / INDEX_FILE
    index.write_bytes(index.read_bytes()[:-25])  # a writer killed in the middle of its last line
    with pytest.warns(UserWarning, match="truncated"):
        scene = Scene.load(tmp_path)
    assert [f.frame_id for f in scene.frames] == ["f000", "f001"]
    with pytest.warns(UserWarning, match="truncated"), SceneWriter(tmp_path, _meta()) as writer:
        writer.add_frame("f003", _rgb(3), _pose(3), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [f.frame_id for f in Scene.load(tmp_path).frames] == ["f000", "f001", "f003"]


def test_corrupt_line_before_the_end_raises(tmp_path):
    _write(tmp_path, 3)
    index = tmp_path / INDEX_FILE
    lines = index.read_text().splitlines(keepends=True)
    index.write_text(lines[0] + lines[1][:20] + "\n" + lines[2])
    with pytest.raises(SceneError, match="line 2 is not valid JSON"):
        Scene.load(tmp_path)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"c2w": np.full((4, 4), np.nan)}, "NaN"),
        ({"c2w": np.diag([2.0, 1.0, 1.0, 1.0])}, "not a rigid"),
        ({"rgb": np.zeros((H + 1, W, 3), np.uint8)}, "as in scene.json"),
        ({"rgb": np.zeros((H, W, 3), np.float32)}, "uint8"),
        ({"depth": np.ones((H, W + 2), np.float32)}, "aligned to rgb"),
        ({"K": np.zeros((3, 3))}, "fx, fy > 0"),
        ({"frame_id": "../evil"}, "ids may only contain"),
        ({"frame_id": "f000"}, "already in this scene"),
    ],
)
def test_bad_frames_raise_and_write_nothing(tmp_path, kwargs, message):
    _write(tmp_path, 1)
    before = _files(tmp_path)
    index_before = (tmp_path / INDEX_FILE).read_bytes()
    args = {"frame_id": "new", "rgb": _rgb(9), "c2w": _pose(9), "timestamp_ns": 1, **kwargs}
    with SceneWriter(tmp_path, _meta()) as writer, pytest.raises(SceneError, match=message):
        writer.add_frame(**args)
    assert _files(tmp_path) == before and (tmp_path / INDEX_FILE).read_bytes() == index_before


def test_bad_scenes_raise_on_load(tmp_path):
    with pytest.raises(SceneError, match="scene.json missing"):
        Scene.load(tmp_path)
    SceneWriter(tmp_path, _meta()).close()
    with pytest.raises(SceneError, match="no frames"):
        Scene.load(tmp_path)
    _write(tmp_path, 2)
    Image.fromarray(np.zeros((H * 2, W * 2, 3), np.uint8)).save(tmp_path / "rgb" / "f001.png")
    with pytest.raises(SceneError, match="resize it"):
        Scene.load(tmp_path)
    with pytest.raises(SceneError, match="different meta"):
        SceneWriter(tmp_path, _meta(depth_scale=0.0001))
    entry = json.loads((tmp_path / INDEX_FILE).read_text().splitlines()[0])
    entry["c2w"][0][3] = float("nan")
    (tmp_path / INDEX_FILE).write_text(json.dumps(entry) + "\n")
    with pytest.raises(SceneError, match="NaN"):
        Scene.load(tmp_path)


def test_bad_meta_raises():
    with pytest.raises(SceneError, match="positive"):
        SceneMeta(width=0, height=H, K=K)
    with pytest.raises(SceneError, match="undistort"):
        SceneMeta(width=W, height=H, K=K, camera_model="OPENCV")


_KILL_WRITER = """
import sys, numpy as np
from m3_memory.core.scene import SceneMeta, SceneWriter
K = [[20.0, 0.0, 7.5], [0.0, 20.0, 5.5], [0.0, 0.0, 1.0]]
writer = SceneWriter(sys.argv[1], SceneMeta(width=16, height=12, K=K))
i = 0
while True:
    writer.add_frame(f"{i:06d}", np.full((12, 16, 3), i % 256, np.uint8), np.eye(4), i,
                     depth=np.ones((12, 16), np.float32))
    i += 1
"""


def test_killed_writer_leaves_a_loadable_scene(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WRITER, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            index = tmp_path / INDEX_FILE
            if index.exists() and index.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is allowed here
        scene = Scene.load(tmp_path)
    assert len(scene) >= 20
    images = scene.images()
    assert all(images[i, 0, 0, 0] == int(f.frame_id) % 256 for i, f in enumerate(scene.frames))
    assert scene.depths().shape == (len(scene), 12, 16)


def test_points_file_round_trips_and_feeds_colmap_init(tmp_path):
    _write(tmp_path, 2)
    scene = Scene.load(tmp_path)
    assert scene.points() is None
    with pytest.raises(SceneError, match="no points3D.npz"):
        initial_points(scene, "colmap")
    xyz = np.random.default_rng(0).normal(size=(5, 3))
    rgb = np.arange(15, dtype=np.uint8).reshape(5, 3) * 10
    write_points(tmp_path, ScenePoints(xyz, rgb))
    points = Scene.load(tmp_path).points()
    np.testing.assert_array_equal(points.xyz, xyz)
    np.testing.assert_array_equal(points.rgb, rgb)
    init_xyz, init_rgb = initial_points(scene, "colmap")
    assert init_xyz.dtype == np.float32 and init_xyz.shape == (5, 3)
    np.testing.assert_allclose(init_rgb, rgb / 255.0, rtol=1e-6)
    assert init_points_from_colmap(scene, max_points=2)[0].shape == (2, 3)
    # depth init still works beside the points file, and an unknown method is named in the error
    assert initial_points(scene, "depth", stride=4, max_points=None)[0].shape == (2 * 3 * 4, 3)
    with pytest.raises(SceneError, match="init must be one of"):
        initial_points(scene, "lidar")
    write_points(tmp_path, ScenePoints(np.zeros((0, 3)), np.zeros((0, 3), np.uint8)))
    with pytest.raises(SceneError, match="no 3D points"):
        initial_points(scene, "colmap")
    (tmp_path / POINTS_FILE).write_bytes(b"not an npz")
    with pytest.raises(SceneError, match="unreadable"):
        scene.points()
    with pytest.raises(SceneError, match="uint8"):
        ScenePoints(xyz, rgb.astype(np.float32))
    with pytest.raises(SceneError, match="NaN"):
        ScenePoints(np.full((1, 3), np.nan), np.zeros((1, 3), np.uint8))


def test_init_points_from_depth_lands_on_plane(tmp_path):
    """A camera looking straight down at the floor z=0 from 2 m: every back-projected point lies on z=0."""
    c2w = make_pose(Rotation.from_euler("x", np.pi).as_matrix(), np.array([0.3, -0.2, 2.0]))
    with SceneWriter(tmp_path, _meta()) as writer:
        writer.add_frame("down", _rgb(0), c2w, 0, depth=np.full((H, W), 2.0, np.float32))
    scene = Scene.load(tmp_path)
    xyz, rgb = init_points_from_depth(scene, stride=1, max_points=None)
    assert xyz.shape == (H * W, 3) and rgb.shape == (H * W, 3)
    np.testing.assert_allclose(xyz[:, 2], 0.0, atol=1e-6)
    # Without subsampling points come in row-major pixel order. Pixel centres are at u + 0.5: pixel (u=7, v=5) has its
    # centre on the principal point (7.5, 5.5), straight below the camera; pixel (9, 5) is 2 px right: camera x
    # 2 / 20 * 2 m = 0.2 m, which is world x + 0.2 (the camera is turned about x only).
    np.testing.assert_allclose(xyz[5 * W + 7], [0.3, -0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(xyz[5 * W + 9], [0.5, -0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(backproject_pixels(np.array([0]), np.array([0]), np.array([2.0]), K, c2w),
                               [[0.3 - 0.7, -0.2 + 0.5, 0.0]], atol=1e-12)
    np.testing.assert_allclose(rgb[5 * W + 7], _rgb(0)[5, 7] / 255.0, rtol=1e-6)
    assert init_points_from_depth(scene, stride=2, max_points=None)[0].shape == (H * W // 4, 3)
    assert init_points_from_depth(scene, stride=1, max_points=50)[0].shape == (50, 3)


def test_interpolate_pose_at_is_exact_at_samples_and_slerps_between():
    stamps = np.array([0, 100, 300], dtype=np.int64)
    poses = np.stack([make_pose(Rotation.from_euler("z", a).as_matrix(), [a, 0, 0]) for a in (0.0, 0.4, 1.2)])
    np.testing.assert_array_equal(interpolate_pose_at(stamps, poses, 100), poses[1])
    mid = interpolate_pose_at(stamps, poses, 200)
    np.testing.assert_allclose(mid, make_pose(Rotation.from_euler("z", 0.8).as_matrix(), [0.8, 0, 0]), atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        interpolate_pose_at(stamps, poses, 301)
