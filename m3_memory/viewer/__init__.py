"""The memory in a browser (viser): `Viewer(memory, host, port)`; `m3 view` and the memory server construct it."""
from m3_memory.viewer.viewer import HIGHLIGHT_RGB, Viewer

__all__ = ["HIGHLIGHT_RGB", "Viewer"]
