"""COLMAP scenes: import of text and binary models (pycolmap), Sim(3) alignment to the robot's poses, `m3
import-colmap`, and training with `init: colmap` (m3_memory.core.scene.colmap, geometry.sim3_fit)."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pycolmap
import pytest
from scipy.spatial.transform import Rotation

from m3_memory.cli.colmap import register
from m3_memory.cli.common import run_verb
from m3_memory.core.geometry import invert_pose, sim3_apply_pose, sim3_fit
from m3_memory.core.scene import Scene, SceneError, import_colmap, init_points_from_depth, read_colmap_model
from m3_memory.sim import demo_scene

# The similarity from the synthetic COLMAP world to the robot's: x_robot = S R x_colmap + T.
S, R, T = 0.37, Rotation.from_euler("zyx", [0.7, -0.4, 1.9]).as_matrix(), np.array([0.4, -1.2, 2.5])


@pytest.fixture(scope="module")
def robot(tmp_path_factory) -> Scene:
    """The tiny demo scene (ground-truth poses, metric depth), copied so that tests cannot touch the cache."""
    target = tmp_path_factory.mktemp("robot") / "tiny"
    shutil.copytree(demo_scene("tiny"), target, ignore=shutil.ignore_patterns("bag", "previews", "features"))
    return Scene.load(target)


def _to_colmap(x: np.ndarray) -> np.ndarray:
    """Robot world points `[P, 3]` → the synthetic COLMAP world (the inverse of S, R, T)."""
    return (x - T) @ R / S


@pytest.fixture(scope="module")
def model_dirs(robot, tmp_path_factory) -> dict[str, object]:
    """A COLMAP reconstruction of the robot scene in another frame and scale, written as text and as binary.

    Image names are the robot's rgb file names (so `robot.root/rgb` is the images folder); even frames use a PINHOLE
    camera, odd ones a SIMPLE_PINHOLE one (the demo camera has fx = fy); points3D are sampled from the depth.
    """
    reconstruction = pycolmap.Reconstruction()
    (fx, _, cx), (_, fy, cy) = robot.Ks[0][:2]
    size = {"width": robot.meta.width, "height": robot.meta.height}
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(camera_id=1, model="PINHOLE", params=[fx, fy, cx, cy],
                                                               **size))
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(camera_id=2, model="SIMPLE_PINHOLE",
                                                               params=[fx, cx, cy], **size))
    for i, frame in enumerate(robot.frames):
        c2w = frame.c2w.copy()
        c2w[:3, 3] = _to_colmap(c2w[:3, 3])
        c2w[:3, :3] = R.T @ c2w[:3, :3]
        image = pycolmap.Image(name=f"{frame.frame_id}.png", camera_id=1 + i % 2, image_id=i + 1)
        reconstruction.add_image_with_trivial_frame(image, pycolmap.Rigid3d(invert_pose(c2w)[:3]))
    xyz, rgb = init_points_from_depth(robot, stride=8, max_points=500, seed=1)
    for point, colour in zip(_to_colmap(xyz.astype(np.float64)), np.rint(rgb * 255).astype(np.uint8)):
        reconstruction.add_point3D(point, pycolmap.Track(), colour)
    root = tmp_path_factory.mktemp("colmap")
    (root / "text").mkdir()
    (root / "binary").mkdir()
    reconstruction.write_text(root / "text")
    reconstruction.write_binary(root / "binary")
    return {"text": root / "text", "binary": root / "binary", "xyz": xyz, "rgb": rgb}


def test_sim3_fit_recovers_a_known_similarity():
    src = np.random.default_rng(0).normal(size=(10, 3))
    s, rot, t = sim3_fit(src, S * src @ R.T + T)
    assert abs(s - S) < 1e-6
    np.testing.assert_allclose(rot, R, atol=1e-6)
    np.testing.assert_allclose(t, T, atol=1e-6)
    # A mirrored target is fitted by a proper rotation, never a reflection.
    _, rot, _ = sim3_fit(src, src * [1.0, 1.0, -1.0])
    assert np.linalg.det(rot) > 0
    with pytest.raises(ValueError, match="collinear"):
        sim3_fit(np.outer(np.arange(5.0), [1.0, 2.0, 3.0]), np.random.default_rng(1).normal(size=(5, 3)))
    with pytest.raises(ValueError, match="at least 3"):
        sim3_fit(src[:2], src[:2])


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_import_round_trips_poses_intrinsics_images_and_points(kind, robot, model_dirs, tmp_path):
    assert sorted(p.suffix for p in model_dirs[kind].iterdir())[0] == (".txt" if kind == "text" else ".bin")
    scene, alignment = import_colmap(model_dirs[kind], robot.root / "rgb", tmp_path / "scene")
    assert alignment is None and scene.world_frame == "colmap" and len(scene) == len(robot)
    assert [f.frame_id for f in scene.frames] == [f.frame_id for f in robot.frames]
    assert scene.depths() is None and scene.timestamps_ns.tolist() == list(range(len(robot)))
    np.testing.assert_allclose(scene.Ks, robot.Ks, atol=1e-12)
    np.testing.assert_allclose(scene.c2w[:, :3, 3], _to_colmap(robot.c2w[:, :3, 3]), atol=1e-9)
    np.testing.assert_allclose(scene.c2w[:, :3, :3], R.T @ robot.c2w[:, :3, :3], atol=1e-9)
    np.testing.assert_array_equal(scene.images(), robot.images())
    points = scene.points()
    np.testing.assert_allclose(points.xyz, _to_colmap(model_dirs["xyz"].astype(np.float64)), atol=1e-9)
    np.testing.assert_array_equal(points.rgb, np.rint(model_dirs["rgb"] * 255).astype(np.uint8))


def test_aligned_import_puts_cameras_and_points_in_the_robot_world(robot, model_dirs, tmp_path):
    scene, alignment = import_colmap(model_dirs["binary"], robot.root / "rgb", tmp_path / "scene", align_to=robot)
    assert alignment.matched == len(robot) and alignment.rms_m < 1e-6
    assert abs(alignment.s - S) < 1e-6
    np.testing.assert_allclose(alignment.R, R, atol=1e-6)
    np.testing.assert_allclose(alignment.t, T, atol=1e-6)
    assert scene.world_frame == robot.world_frame
    np.testing.assert_allclose(scene.c2w, robot.c2w, atol=1e-6)
    np.testing.assert_allclose(scene.points().xyz, model_dirs["xyz"], atol=1e-5)  # float32 depth samples
    np.testing.assert_allclose(sim3_apply_pose(S, R, T, np.eye(4))[:3, 3], T)


def test_import_errors(robot, model_dirs, tmp_path):
    with pytest.raises(SceneError, match="does not exist"):
        read_colmap_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SceneError, match="not a readable COLMAP model"):
        read_colmap_model(tmp_path / "empty")
    with pytest.raises(SceneError, match="not found in"):
        import_colmap(model_dirs["text"], tmp_path, tmp_path / "a")
    import_colmap(model_dirs["text"], robot.root / "rgb", tmp_path / "b")
    with pytest.raises(SceneError, match="already holds a scene"):
        import_colmap(model_dirs["text"], robot.root / "rgb", tmp_path / "b")
    other = Scene.load(tmp_path / "b")   # frame ids match, but only after renaming them does nothing match
    for frame in other.frames:
        frame.frame_id = "x" + frame.frame_id
    with pytest.raises(SceneError, match="only 0 COLMAP images match"):
        import_colmap(model_dirs["text"], robot.root / "rgb", tmp_path / "c", align_to=other)
    distorted = tmp_path / "distorted"
    shutil.copytree(model_dirs["text"], distorted)
    cameras = distorted / "cameras.txt"
    lines = [line for line in cameras.read_text().splitlines() if not line.startswith("2 ")]
    cameras.write_text("\n".join([*lines, "2 SIMPLE_RADIAL 160 120 116.4 79.5 59.5 0.01"]) + "\n")
    with pytest.raises(SceneError, match="image_undistorter"):
        import_colmap(distorted, robot.root / "rgb", tmp_path / "d")


def test_import_colmap_verb_then_train_with_colmap_init(robot, model_dirs, tmp_path, capsys):
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.pipeline import load_train_config, scene_features
    from m3_memory.core.trainer import train

    parser = argparse.ArgumentParser(prog="m3")
    register(parser.add_subparsers(dest="verb", required=True))
    out = tmp_path / "scene"
    args = parser.parse_args(["import-colmap", str(model_dirs["text"]), str(robot.root / "rgb"), "--out", str(out),
                              "--align-to", str(robot.root)])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == len(robot) and summary["points"] == 500 and summary["world_frame"] == "world"
    assert summary["alignment"]["matched"] == len(robot) and abs(summary["alignment"]["scale"] - S) < 1e-6
    assert run_verb("import-colmap", args.func, args) == 1 and "already holds a scene" in capsys.readouterr().err

    scene = Scene.load(out)
    config = load_train_config(None, {"iterations": 20, "init": "colmap", "device": "cpu"})
    with pytest.raises(SceneError, match="init: colmap"):
        train(scene, {}, load_train_config(None, {"iterations": 1, "init": "depth", "device": "cpu"}),
              tmp_path / "never.pt")
    memory = train(scene, scene_features(scene, out, ["m3-tinyvlm"]), config, tmp_path / "memory.pt")
    assert memory.iteration == 20 and len(memory.gaussians) > 0
    loaded, _ = load_memory(tmp_path / "memory.pt", "cpu")
    assert loaded.world_frame == "world" and loaded.iteration == 20
    # The Gaussians started at the aligned points3D: the means are still near them after 20 iterations.
    means = loaded.gaussians.means.numpy()
    assert np.median(np.abs(np.median(means, axis=0) - np.median(model_dirs["xyz"], axis=0))) < 0.05
