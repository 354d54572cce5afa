"""numpy points → sensor_msgs/PointCloud2 (x, y, z float32 and a packed rgb, as RViz's PointCloud2 display reads it)."""
from __future__ import annotations

import numpy as np
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

_FIELDS = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
           for i, name in enumerate(("x", "y", "z", "rgb"))]


def point_cloud(header: Header, xyz: np.ndarray, rgb: np.ndarray | None = None) -> PointCloud2:
    """`xyz: [P, 3]` metres and `rgb: [P, 3]` in [0, 1] (grey when None) as an unorganised cloud."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    colour = np.full_like(xyz, 0.7) if rgb is None else np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
    packed = (np.clip(colour, 0, 1) * 255).round().astype(np.uint32)
    packed = (packed[:, 0] << 16) | (packed[:, 1] << 8) | packed[:, 2]
    data = np.empty((len(xyz), 4), dtype=np.float32)
    data[:, :3] = xyz
    data[:, 3] = packed.view(np.float32)
    return PointCloud2(header=header, height=1, width=len(xyz), fields=_FIELDS, is_bigendian=False, point_step=16,
                       row_step=16 * len(xyz), data=data.tobytes(), is_dense=True)
