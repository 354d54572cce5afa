"""A time-indexed transform tree (what tf2's buffer does), for composing the robot's pose chain at image time.

Edges are `parent → child` poses `T: [4, 4]` (`p_parent = T @ p_child`), static or sampled over time. A look-up composes
the chain between two frames at one stamp, interpolating every sampled edge (linear translation, slerp rotation) and
refusing to extrapolate past a tolerance: a frame whose pose would be a guess is rejected with the reason. A sample far
older than its edge's newest one means time jumped back (a bag replayed again, a bag after live data): the sampled
history is cleared then, as tf2 clears its buffer on a jump back in time (static edges stay).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from m3_memory.core.errors import M3Error
from m3_memory.core.geometry import interpolate_pose, invert_pose, is_rigid


class TransformError(M3Error, LookupError):
    """No trustworthy transform at the requested time; `reason` is a short key for counting (no_path, stale, gap)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Samples:
    stamps: list[int] = field(default_factory=list)
    poses: list[np.ndarray] = field(default_factory=list)

    def insert(self, stamp_ns: int, pose: np.ndarray) -> None:
        index = bisect.bisect_left(self.stamps, stamp_ns)
        if index < len(self.stamps) and self.stamps[index] == stamp_ns:
            self.poses[index] = pose
            return
        self.stamps.insert(index, stamp_ns)
        self.poses.insert(index, pose)

    def drop_before(self, stamp_ns: int) -> None:
        # Keep one sample before the cut so look-ups right at the cut can still interpolate.
        index = max(bisect.bisect_left(self.stamps, stamp_ns) - 1, 0)
        del self.stamps[:index], self.poses[:index]


class TransformBuffer:
    """Transform tree over time.

    `tolerance_ns`: how far outside an edge's sampled range a look-up may hold the nearest sample.
    `max_gap_ns`: two samples further apart than this are not interpolated between (the link was lost).
    `history_ns`: samples older than this behind the newest one are forgotten.
    `jump_back_ns`: a sample this much older than its edge's newest one means time jumped back: history is cleared.
    """

    def __init__(self, tolerance_ns: int = 0, max_gap_ns: int = 500_000_000, history_ns: int = 60 * 10**9,
                 jump_back_ns: int = 10**9):
        self.tolerance_ns, self.max_gap_ns, self.history_ns = tolerance_ns, max_gap_ns, history_ns
        self.jump_back_ns = jump_back_ns
        self._parent: dict[str, str] = {}
        self._static: dict[str, np.ndarray] = {}
        self._samples: dict[str, _Samples] = {}

    def set_transform(self, parent: str, child: str, stamp_ns: int, pose: np.ndarray, static: bool = False) -> int:
        """Add `parent → child` `pose: [4, 4]` at `stamp_ns` (ignored for static edges).

        Returns how far time jumped back (ns) when this sample cleared the sampled history, else 0. Raises ValueError
        for a pose that is not a finite rigid transform (nothing is stored then).
        """
        if not (parent and child) or parent == child:
            raise ValueError(f"transform {parent!r} → {child!r} needs two different, non-empty frame names")
        pose = np.asarray(pose, dtype=np.float64)
        if not is_rigid(pose):
            raise ValueError(f"transform {parent} → {child} is not a finite rigid pose (NaN/inf or a non-orthonormal "
                             f"rotation): {pose.tolist()}")
        jumped = 0
        newest = self._samples[child].stamps[-1] if child in self._samples and not static else None
        if newest is not None and stamp_ns < newest - self.jump_back_ns:
            jumped = newest - int(stamp_ns)
            self.clear()
        if self._parent.get(child, parent) != parent:
            # tf2 semantics: a frame has one parent; a new parent replaces the old link.
            self._static.pop(child, None)
            self._samples.pop(child, None)
        self._parent[child] = parent
        if static:
            self._static[child] = pose
            self._samples.pop(child, None)
            return jumped
        self._static.pop(child, None)
        samples = self._samples.setdefault(child, _Samples())
        samples.insert(int(stamp_ns), pose)
        samples.drop_before(samples.stamps[-1] - self.history_ns)
        return jumped

    def clear(self) -> None:
        """Forget every sampled edge (their links come back with their next samples); static edges stay."""
        for child in self._samples:
            del self._parent[child]
        self._samples.clear()

    def _path_to_root(self, frame: str) -> list[str]:
        path = [frame]
        while path[-1] in self._parent:
            path.append(self._parent[path[-1]])
            if len(path) > len(self._parent) + 1:
                raise TransformError("no_path", f"transform tree has a loop through {frame!r}")
        return path

    def chain(self, target: str, source: str) -> tuple[list[str], list[str]]:
        """Frames from `source` up to the common ancestor, and from `target` up to it (each excluding the ancestor)."""
        up_source, up_target = self._path_to_root(source), self._path_to_root(target)
        common = next((f for f in up_source if f in set(up_target)), None)
        if common is None:
            known = ", ".join(sorted(set(self._parent) | set(self._parent.values()))) or "none yet"
            raise TransformError("no_path", f"no transform chain connects {target!r} and {source!r} (frames: {known})")
        return up_source[:up_source.index(common)], up_target[:up_target.index(common)]

    def _edge(self, child: str, stamp_ns: int) -> np.ndarray:
        if child in self._static:
            return self._static[child]
        samples, parent = self._samples[child], self._parent[child]
        stamps = samples.stamps
        index = bisect.bisect_left(stamps, stamp_ns)
        if index < len(stamps) and stamps[index] == stamp_ns:
            return samples.poses[index]
        if index == 0 or index == len(stamps):
            nearest = 0 if index == 0 else len(stamps) - 1
            offset = stamp_ns - stamps[nearest]
            if abs(offset) > self.tolerance_ns:
                when = "after the newest" if offset > 0 else "before the oldest"
                raise TransformError("stale", f"transform {parent} → {child}: stamp is {abs(offset) / 1e9:.3f} s {when} "
                                              f"sample (tolerance {self.tolerance_ns / 1e9:.3f} s)")
            return samples.poses[nearest]
        lo, hi = stamps[index - 1], stamps[index]
        if hi - lo > self.max_gap_ns:
            raise TransformError("gap", f"transform {parent} → {child}: {(hi - lo) / 1e9:.3f} s without samples around "
                                        f"the stamp (max gap {self.max_gap_ns / 1e9:.3f} s)")
        return interpolate_pose(samples.poses[index - 1], samples.poses[index], (stamp_ns - lo) / (hi - lo))

    def lookup(self, target: str, source: str, stamp_ns: int) -> np.ndarray:
        """`target_T_source: [4, 4]` at `stamp_ns`: maps points of `source` into `target` (e.g. world ← camera)."""
        from_source, from_target = self.chain(target, source)
        return invert_pose(self._from_ancestor(from_target, stamp_ns)) @ self._from_ancestor(from_source, stamp_ns)

    def _from_ancestor(self, frames: list[str], stamp_ns: int) -> np.ndarray:
        """`ancestor_T_frames[0]`, composed down the chain: T(ancestor → f_k) @ ... @ T(f_1 → f_0)."""
        pose = np.eye(4)
        for child in reversed(frames):
            pose = pose @ self._edge(child, stamp_ns)
        return pose

    def covers(self, target: str, source: str, stamp_ns: int) -> bool:
        """True once every sampled edge between the frames has a sample at or after `stamp_ns` (waiting longer won't
        change the answer); False while some edge's data has not caught up with the stamp, or no chain exists yet."""
        try:
            from_source, from_target = self.chain(target, source)
        except TransformError:
            return False
        return all(child in self._static or self._samples[child].stamps[-1] >= stamp_ns
                   for child in from_source + from_target)

    def latest_common_stamp(self, target: str, source: str) -> int | None:
        """Newest stamp at which every sampled edge between the frames has data (None when there is no chain; static
        chains answer 0, meaning any time)."""
        try:
            from_source, from_target = self.chain(target, source)
        except TransformError:
            return None
        stamps = [self._samples[c].stamps[-1] for c in from_source + from_target if c not in self._static]
        return min(stamps) if stamps else 0
