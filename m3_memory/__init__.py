"""m3-memory: a ROS 2 spatial memory for robots built on M3 (3D-Spatial Multimodal Memory, ICLR 2025)."""

__version__ = "0.1.0"
