"""Rigid pose helpers shared by the scene format, the simulator and the TF consumers.

Poses are 4x4 homogeneous float64 matrices `T: [4, 4]` mapping child-frame points into the parent frame
(`p_parent = T @ p_child`), which is what a ROS transform `parent -> child` carries. Quaternions follow ROS order
`(x, y, z, w)`; the rotation algebra is scipy's, none is written by hand here.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation, Slerp


def make_pose(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Build `T: [4, 4]` from `rotation: [3, 3]` and `translation: [3]`."""
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = translation
    return pose


def pose_from_xyzw(quat_xyzw: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Build `T: [4, 4]` from a ROS quaternion `quat_xyzw: [4]` (normalised here) and `translation: [3]`."""
    return make_pose(Rotation.from_quat(np.asarray(quat_xyzw, dtype=float)).as_matrix(), translation)


def xyzw_from_pose(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split `pose: [4, 4]` into `(quat_xyzw: [4], translation: [3])`, with w >= 0 for a unique sign."""
    quat = Rotation.from_matrix(pose[:3, :3]).as_quat()
    return (quat if quat[3] >= 0 else -quat), pose[:3, 3].copy()


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of a rigid `pose: [4, 4]` (transpose rotation rather than a general matrix inverse)."""
    rot_t = pose[:3, :3].T
    return make_pose(rot_t, -rot_t @ pose[:3, 3])


def interpolate_pose(pose0: np.ndarray, pose1: np.ndarray, alpha: float) -> np.ndarray:
    """Pose a fraction `alpha` in [0, 1] from `pose0` to `pose1`: linear translation, slerp rotation (as tf2 does)."""
    slerp = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([pose0[:3, :3], pose1[:3, :3]])))
    rotation = slerp([alpha]).as_matrix()[0]
    return make_pose(rotation, (1.0 - alpha) * pose0[:3, 3] + alpha * pose1[:3, 3])


def interpolate_pose_at(stamps_ns: np.ndarray, poses: np.ndarray, stamp_ns: int) -> np.ndarray:
    """Pose of a sampled trajectory at `stamp_ns` (int nanoseconds).

    `stamps_ns: [n]` strictly increasing int64, `poses: [n, 4, 4]`. Raises ValueError outside `[stamps_ns[0],
    stamps_ns[-1]]` (no extrapolation, like tf2). Integer stamps keep the interpolation weight exact at ROS epoch
    times, where float seconds would lose sub-microsecond resolution.
    """
    if stamp_ns < stamps_ns[0] or stamp_ns > stamps_ns[-1]:
        raise ValueError(f"stamp {stamp_ns} ns outside the sampled range [{stamps_ns[0]}, {stamps_ns[-1]}] ns")
    hi = int(np.searchsorted(stamps_ns, stamp_ns, side="left"))
    if stamps_ns[hi] == stamp_ns:
        return poses[hi].copy()
    lo = hi - 1
    alpha = (stamp_ns - int(stamps_ns[lo])) / (int(stamps_ns[hi]) - int(stamps_ns[lo]))
    return interpolate_pose(poses[lo], poses[hi], alpha)


def look_at_opencv(eye: np.ndarray, target: np.ndarray, up: tuple[float, float, float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world `T: [4, 4]` of an OpenCV camera (x right, y down, z forward) at `eye: [3]` facing `target: [3]`,
    image up as close to `up` as possible."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    return make_pose(np.stack([right, down, forward], axis=1), eye)


def is_rigid(pose: np.ndarray, tol: float = 1e-4) -> bool:
    """True if `pose: [4, 4]` is finite, has an orthonormal rotation with det +1 and a `[0, 0, 0, 1]` last row."""
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        return False
    rot = pose[:3, :3]
    return (
        np.allclose(rot.T @ rot, np.eye(3), atol=tol)
        and abs(np.linalg.det(rot) - 1.0) < tol
        and np.allclose(pose[3], [0.0, 0.0, 0.0, 1.0], atol=tol)
    )
