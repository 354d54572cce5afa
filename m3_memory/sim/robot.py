"""The robot's pose chain and sensor timing for the demo scene (the paper's mobile manipulator, eq. 3).

Chain (ROS parent -> child; a transform maps child points into its parent)::

    world -> lidar                        dynamic: lidar odometry, 10 Hz (/tf and /odom)
    lidar -> base_link                    static: the lidar is mounted on the base
    base_link -> arm_base                 static
    arm_base -> ee_link                   dynamic: the arm, ~100 Hz
    ee_link -> camera_color_optical_frame static: hand-eye calibration, optical convention (x right, y down, z forward)

The base drives around the table while the arm keeps the wrist camera pointed at it, so neither the odometry nor
the arm alone gives the camera pose. The sampled transforms *are* the ground truth: the camera pose at any stamp is
the chain composed from the samples interpolated at that stamp (linear translation, slerp rotation, like tf2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from m3_memory.core.geometry import interpolate_pose_at, invert_pose, look_at_opencv, make_pose
from m3_memory.sim.world import TABLE_TOP_Z

WORLD, LIDAR, BASE, ARM_BASE, EE, CAMERA = (
    "world",
    "lidar",
    "base_link",
    "arm_base",
    "ee_link",
    "camera_color_optical_frame",
)
START_NS = 1_750_000_000 * 10**9  # a plausible wall-clock epoch, so consumers face real-sized stamps


def pose_xyz_rpy(xyz: tuple[float, float, float], rpy: tuple[float, float, float]) -> np.ndarray:
    """`[4, 4]` pose from a translation and fixed-axis roll/pitch/yaw (rad)."""
    return make_pose(Rotation.from_euler("xyz", rpy).as_matrix(), np.asarray(xyz, dtype=float))


# Optical frame axes in a forward-x link frame: optical z = link x, optical x = -link y, optical y = -link z.
_OPTICAL_IN_LINK = make_pose(np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), np.zeros(3))


@dataclass(frozen=True)
class RigConfig:
    """Geometry of the robot and of its walk around the table (metres, radians)."""

    base_radius: float = 1.3  # base circle around the table centre
    start_angle: float = -np.pi / 2
    arc: float = 2 * np.pi * 0.95  # angle swept by the base over the recording
    camera_radius: float = 0.9
    camera_height: float = 0.55  # above the table top
    height_wobble: float = 0.08
    target_wobble: float = 0.06
    # The look-at point's x is this fraction of the camera's (0: the table centre; 1: straight across the table, so a
    # short arc along a long side sees the table strip by strip, one end before the other).
    target_follow_x: float = 0.0
    lidar_in_base: tuple = ((0.12, 0.0, 0.42), (0.0, 0.0, 0.0))
    arm_base_in_base: tuple = ((0.15, 0.10, 0.36), (0.0, 0.0, np.pi / 2))
    camera_in_ee: tuple = ((0.045, 0.0, 0.035), (0.02, -0.03, 0.015))  # small hand-eye rotation, before optical


@dataclass(frozen=True)
class TimingConfig:
    """Sensor rates and imperfections."""

    duration_s: float
    camera_hz: float = 30.0
    odom_hz: float = 10.0
    arm_hz: float = 100.0
    camera_jitter_s: float = 0.002
    odom_jitter_s: float = 0.003
    arm_jitter_s: float = 0.0005
    drop_fraction: float = 0.03  # camera frames lost in transport (at least one)


@dataclass
class Trajectory:
    """Sampled pose chain and camera stamps. `*_stamps_ns: [n]` int64, poses `[n, 4, 4]` float64."""

    odom_stamps_ns: np.ndarray
    world_T_lidar: np.ndarray
    arm_stamps_ns: np.ndarray
    arm_base_T_ee: np.ndarray
    lidar_T_base: np.ndarray
    base_T_arm_base: np.ndarray
    ee_T_camera: np.ndarray
    camera_stamps_ns: np.ndarray  # frames that reach the bag
    dropped_stamps_ns: np.ndarray

    def camera_pose(self, stamp_ns: int) -> np.ndarray:
        """World-from-camera `[4, 4]` (OpenCV optical frame) at `stamp_ns`: eq. 3 composed from interpolated links."""
        world_T_lidar = interpolate_pose_at(self.odom_stamps_ns, self.world_T_lidar, stamp_ns)
        arm_base_T_ee = interpolate_pose_at(self.arm_stamps_ns, self.arm_base_T_ee, stamp_ns)
        return world_T_lidar @ self.lidar_T_base @ self.base_T_arm_base @ arm_base_T_ee @ self.ee_T_camera

    def static_transforms(self) -> list[tuple[str, str, np.ndarray]]:
        """`(parent, child, T [4, 4])` of the three static links."""
        return [
            (LIDAR, BASE, self.lidar_T_base),
            (BASE, ARM_BASE, self.base_T_arm_base),
            (EE, CAMERA, self.ee_T_camera),
        ]


def _base_pose(rig: RigConfig, progress: float) -> np.ndarray:
    """World-from-base_link: on the circle, heading along it counter-clockwise (table on the base's left)."""
    angle = rig.start_angle + rig.arc * progress
    position = rig.base_radius * np.array([np.cos(angle), np.sin(angle), 0.0])
    return make_pose(Rotation.from_euler("z", angle + np.pi / 2).as_matrix(), position)


def _camera_goal(rig: RigConfig, progress: float) -> np.ndarray:
    """Where the arm should hold the camera: on a wobbling inner circle, looking at a wandering point on the table."""
    angle = rig.start_angle + rig.arc * progress + 0.05 * np.sin(3 * np.pi * progress)
    radius = rig.camera_radius + 0.05 * np.sin(4 * np.pi * progress)
    height = TABLE_TOP_Z + rig.camera_height + rig.height_wobble * np.sin(3 * np.pi * progress)
    eye = np.array([radius * np.cos(angle), radius * np.sin(angle), height])
    wobble = rig.target_wobble * np.array([np.sin(2 * np.pi * progress), np.cos(2.6 * np.pi * progress), 0.0])
    return look_at_opencv(eye, np.array([rig.target_follow_x * eye[0], 0.0, TABLE_TOP_Z + 0.04]) + wobble)


def _stamps(rng: np.random.Generator, start_s: float, stop_s: float, hz: float, jitter_s: float) -> np.ndarray:
    """Nominal-rate stamps in [start_s, stop_s] relative to START_NS, with uniform jitter (< half a period)."""
    nominal = np.arange(start_s, stop_s + 1e-9, 1.0 / hz)
    jittered = nominal + rng.uniform(-jitter_s, jitter_s, size=len(nominal))
    return START_NS + np.rint(jittered * 1e9).astype(np.int64)


def make_trajectory(rig: RigConfig, timing: TimingConfig, rng: np.random.Generator) -> Trajectory:
    """Sample the chain: odometry and arm streams cover the camera stream with a margin, so every frame has TF."""
    duration = timing.duration_s
    lidar_in_base = pose_xyz_rpy(*rig.lidar_in_base)
    base_T_arm_base = pose_xyz_rpy(*rig.arm_base_in_base)
    ee_T_camera = pose_xyz_rpy(*rig.camera_in_ee) @ _OPTICAL_IN_LINK

    odom_ns = _stamps(rng, -0.15, duration + 0.15, timing.odom_hz, timing.odom_jitter_s)
    progress = lambda ns: (ns - START_NS) * 1e-9 / duration  # noqa: E731
    world_T_lidar = np.stack([_base_pose(rig, progress(ns)) @ lidar_in_base for ns in odom_ns])

    arm_ns = _stamps(rng, -0.05, duration + 0.05, timing.arm_hz, timing.arm_jitter_s)
    trajectory = Trajectory(
        odom_ns,
        world_T_lidar,
        arm_ns,
        np.empty((0, 4, 4)),
        invert_pose(lidar_in_base),
        base_T_arm_base,
        ee_T_camera,
        np.empty(0, np.int64),
        np.empty(0, np.int64),
    )
    # The arm tracks the camera goal given where the (interpolated) odometry puts its base at each arm sample.
    arm_poses = []
    for ns in arm_ns:
        world_T_arm_base = (
            interpolate_pose_at(odom_ns, world_T_lidar, int(ns)) @ trajectory.lidar_T_base @ base_T_arm_base
        )
        arm_poses.append(invert_pose(world_T_arm_base) @ _camera_goal(rig, progress(ns)) @ invert_pose(ee_T_camera))
    trajectory.arm_base_T_ee = np.stack(arm_poses)

    camera_ns = _stamps(rng, 0.0, duration, timing.camera_hz, timing.camera_jitter_s)
    n_drop = max(1, int(round(timing.drop_fraction * len(camera_ns))))
    dropped = np.sort(rng.choice(np.arange(1, len(camera_ns) - 1), size=n_drop, replace=False))
    trajectory.camera_stamps_ns = np.delete(camera_ns, dropped)
    trajectory.dropped_stamps_ns = camera_ns[dropped]
    return trajectory
