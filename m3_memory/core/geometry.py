"""Pose and camera geometry shared by the scene format, the simulator, the TF consumers and the queries.

Poses are 4x4 homogeneous float64 matrices `T: [4, 4]` mapping child-frame points into the parent frame
(`p_parent = T @ p_child`), which is what a ROS transform `parent -> child` carries. Quaternions follow ROS order
`(x, y, z, w)`; the rotation algebra is scipy's. `backproject_pixels` is the one pixel-to-world back-projection (its
docstring states the pixel convention); `sim3_fit` aligns two frames from matched points (e.g. camera centres).
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


def backproject_pixels(us: np.ndarray, vs: np.ndarray, z: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """World points `[P, 3]` of the pixels in columns `us: [P]`, rows `vs: [P]` (integer) at camera z `z: [P]`.

    Pixel convention: the centre of pixel (u, v) lies at image coordinates (u + 0.5, v + 0.5), as in our rasterizers,
    gsplat and COLMAP, so `K: [3, 3]` maps a camera point to the continuous coordinate of which pixel u covers
    [u, u + 1). `c2w: [4, 4]` camera-to-world, OpenCV camera (x right, y down, z forward).
    """
    z = np.asarray(z, dtype=np.float64)
    cam = np.stack([(us + 0.5 - K[0, 2]) * z / K[0, 0], (vs + 0.5 - K[1, 2]) * z / K[1, 1], z], axis=1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def sim3_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity `dst ≈ s R src + t` of matched points `src, dst: [n, 3]` (Umeyama 1991, closed form).

    Returns `(s, R: [3, 3] proper rotation, t: [3])`. Raises ValueError for fewer than 3 pairs or points that are all
    collinear (the rotation about their line is then undetermined).
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"sim3_fit needs two [n, 3] arrays of matched points, got {src.shape} and {dst.shape}")
    if len(src) < 3:
        raise ValueError(f"sim3_fit needs at least 3 matched points, got {len(src)}")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_src, dst - mu_dst
    var_src = (a**2).sum() / len(src)
    u, sigma, vt = np.linalg.svd(b.T @ a / len(src))   # cross-covariance Σ_dst,src
    if var_src <= 0 or sigma[1] <= 1e-12 * max(sigma[0], 1e-300):
        raise ValueError("sim3_fit: the points are (nearly) collinear or coincident; a similarity is undetermined")
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2] = -1.0   # a reflection fits better: take the best proper rotation instead
    R = u @ np.diag(sign) @ vt
    s = float((sigma * sign).sum() / var_src)
    return s, R, mu_dst - s * R @ mu_src


def sim3_apply_pose(s: float, R: np.ndarray, t: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world `[4, 4]` of `c2w: [4, 4]` after mapping its world by `x -> s R x + t` (the camera itself keeps
    its size: only its centre is scaled)."""
    return make_pose(R @ c2w[:3, :3], s * R @ c2w[:3, 3] + t)
