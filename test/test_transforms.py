"""Transform tree look-ups (eq. 3 chain) and keyframe selection, in core (no ROS)."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from m3_memory.core.geometry import make_pose
from m3_memory.core.recording import (FrameError, KeyframeConfig, KeyframeSelector, check_intrinsics, missing_frames,
                                      sharpness)
from m3_memory.core.transforms import TransformBuffer, TransformError

SECOND = 10**9


def pose(yaw_deg=0.0, xyz=(0.0, 0.0, 0.0)):
    return make_pose(Rotation.from_euler("z", yaw_deg, degrees=True).as_matrix(), np.asarray(xyz, dtype=float))


def robot_buffer(**kwargs) -> TransformBuffer:
    """world →(dynamic) lidar →(static) base_link →(static) arm_base →(dynamic) ee_link →(static) camera."""
    buffer = TransformBuffer(**kwargs)
    for k in range(11):
        buffer.set_transform("world", "lidar", k * SECOND // 10, pose(9.0 * k, (0.1 * k, 0.0, 0.0)))
    for k in range(101):
        buffer.set_transform("arm_base", "ee_link", k * SECOND // 100, pose(0.5 * k, (0.3, 0.0, 0.01 * k)))
    buffer.set_transform("lidar", "base_link", 0, pose(0.0, (-0.1, 0.0, -0.4)), static=True)
    buffer.set_transform("base_link", "arm_base", 0, pose(90.0, (0.15, 0.1, 0.36)), static=True)
    buffer.set_transform("ee_link", "camera", 0, pose(-90.0, (0.05, 0.0, 0.03)), static=True)
    return buffer


def test_chain_composes_every_link_at_the_stamp():
    buffer = robot_buffer()
    stamp = 35 * SECOND // 100  # between odometry samples 3 and 4, on an arm sample
    world_T_lidar = make_pose(Rotation.from_euler("z", 31.5, degrees=True).as_matrix(), [0.35, 0.0, 0.0])
    expected = (world_T_lidar @ pose(0.0, (-0.1, 0.0, -0.4)) @ pose(90.0, (0.15, 0.1, 0.36))
                @ pose(17.5, (0.3, 0.0, 0.35)) @ pose(-90.0, (0.05, 0.0, 0.03)))
    np.testing.assert_allclose(buffer.lookup("world", "camera", stamp), expected, atol=1e-12)
    # The inverse direction and a look-up between two branches of the tree agree with it.
    np.testing.assert_allclose(buffer.lookup("camera", "world", stamp) @ expected, np.eye(4), atol=1e-12)
    lidar_T_camera = buffer.lookup("lidar", "camera", stamp)
    np.testing.assert_allclose(world_T_lidar @ lidar_T_camera, expected, atol=1e-12)


def test_stale_gap_and_missing_links_are_refused_with_a_reason():
    buffer = robot_buffer()
    with pytest.raises(TransformError, match="after the newest") as stale:
        buffer.lookup("world", "camera", 1_200_000_000)
    assert stale.value.reason == "stale"
    with pytest.raises(TransformError) as before:
        buffer.lookup("world", "camera", -1)
    assert before.value.reason == "stale"
    with pytest.raises(TransformError, match="no transform chain") as missing:
        buffer.lookup("world", "gripper_camera", 0)
    assert missing.value.reason == "no_path"
    gappy = TransformBuffer(max_gap_ns=SECOND // 2)
    gappy.set_transform("world", "lidar", 0, pose())
    gappy.set_transform("world", "lidar", 2 * SECOND, pose(10.0))
    with pytest.raises(TransformError) as gap:
        gappy.lookup("world", "lidar", SECOND)
    assert gap.value.reason == "gap"


def test_tolerance_holds_the_nearest_sample_only_that_far():
    buffer = robot_buffer(tolerance_ns=SECOND // 20)
    last = buffer.lookup("world", "camera", SECOND)
    np.testing.assert_allclose(buffer.lookup("world", "camera", SECOND + SECOND // 50), last)
    with pytest.raises(TransformError):
        buffer.lookup("world", "camera", SECOND + SECOND // 10)


def test_covers_says_when_waiting_is_over():
    buffer = robot_buffer()
    assert buffer.covers("world", "camera", SECOND)
    assert not buffer.covers("world", "camera", SECOND + 1)
    assert not buffer.covers("world", "nowhere", 0)


def test_out_of_order_samples_and_reparenting():
    buffer = TransformBuffer(max_gap_ns=3 * SECOND, jump_back_ns=5 * SECOND)
    buffer.set_transform("world", "lidar", 2 * SECOND, pose(20.0))
    buffer.set_transform("world", "lidar", 0, pose(0.0))
    np.testing.assert_allclose(buffer.lookup("world", "lidar", SECOND), pose(10.0), atol=1e-12)
    buffer.set_transform("map", "lidar", 0, pose(0.0, (1.0, 0.0, 0.0)), static=True)
    with pytest.raises(TransformError):
        buffer.lookup("world", "lidar", SECOND)
    np.testing.assert_allclose(buffer.lookup("map", "lidar", 5 * SECOND)[:3, 3], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        buffer.set_transform("a", "a", 0, pose())


def test_a_jump_back_in_time_clears_the_sampled_history_but_not_the_static_links():
    buffer = robot_buffer()
    assert buffer.set_transform("world", "lidar", SECOND + SECOND // 10, pose()) == 0  # 0.1 s ahead: no jump
    assert buffer.set_transform("world", "lidar", SECOND - SECOND // 2, pose(4.5)) == 0  # late by less than 1 s
    # A replay from the start: the first old sample clears every sampled edge (as tf2 does on a jump back).
    assert buffer.set_transform("world", "lidar", 0, pose()) == SECOND + SECOND // 10
    with pytest.raises(TransformError) as unlinked:
        buffer.lookup("world", "camera", 0)
    assert unlinked.value.reason == "no_path"  # the arm edge has no sample of the new time line yet
    for k in range(3):
        buffer.set_transform("arm_base", "ee_link", k * SECOND // 100, pose(0.5 * k, (0.3, 0.0, 0.01 * k)))
    assert buffer.covers("world", "camera", 0)  # static links survived the clear
    np.testing.assert_allclose(buffer.lookup("world", "camera", 0), robot_buffer().lookup("world", "camera", 0))


@pytest.mark.parametrize("bad", [np.full((4, 4), np.nan), np.diag([2.0, 1.0, 1.0, 1.0]), np.eye(3)])
def test_non_finite_or_non_rigid_poses_are_refused_and_not_stored(bad):
    buffer = robot_buffer()
    with pytest.raises(ValueError, match="not a finite rigid pose"):
        buffer.set_transform("world", "lidar", 2 * SECOND, bad)
    assert not buffer.covers("world", "camera", 2 * SECOND)
    assert np.all(np.isfinite(buffer.lookup("world", "camera", SECOND)))


def test_intrinsics_must_fit_the_image():
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    check_intrinsics(K, 640, 480)
    with pytest.raises(FrameError, match=r"principal point \(320, 240\) lies outside the 64x48") as other:
        check_intrinsics(K, 64, 48)
    assert other.value.reason == "bad_camera_info"
    for bad in (np.zeros((3, 3)), np.full((3, 3), np.nan), np.diag([500.0, -1.0, 1.0])):
        with pytest.raises(FrameError, match="fx, fy > 0"):
            check_intrinsics(bad, 640, 480)


def test_missing_frames_follow_the_measured_rate():
    period = SECOND // 15
    assert missing_frames(np.full(50, period)) == 0  # a steady 15 Hz stream loses nothing, whatever was configured
    steps = np.full(50, period)
    steps[[10, 30]] = [2 * period + 3_000_000, 4 * period]  # one, then three frames lost (with jitter)
    assert missing_frames(steps) == 4
    assert missing_frames([5 * period, period]) == 0  # too few steps to know the rate


def textured(seed=0, size=96):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def box_blur(image, k=7):
    padded = np.pad(image.astype(np.float32), ((k // 2,) * 2, (k // 2,) * 2, (0, 0)), mode="edge")
    out = np.zeros(image.shape, np.float32)
    for dy in range(k):
        for dx in range(k):
            out += padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
    return (out / k**2).astype(np.uint8)


def test_keyframes_need_motion_and_sharpness():
    selector = KeyframeSelector(KeyframeConfig(min_translation_m=0.1, min_rotation_deg=10.0, blur_ratio=0.5))
    assert selector.consider(pose(), textured(0)) == (True, None)
    assert selector.consider(pose(0.0, (0.05, 0, 0)), textured(1)) == (False, "no_motion")
    assert selector.consider(pose(12.0), textured(2)) == (True, None)
    assert selector.consider(pose(12.0, (0.5, 0, 0)), box_blur(textured(3))) == (False, "blurred")
    assert selector.consider(pose(12.0, (0.5, 0, 0)), textured(4)) == (True, None)
    assert sharpness(box_blur(textured(5))) < 0.1 * sharpness(textured(5))
