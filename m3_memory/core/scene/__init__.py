"""Captured scenes: the directory format (`format`), COLMAP import (`colmap`) and initial points (`init`).

Everything public is re-exported here: `from m3_memory.core.scene import Scene, SceneError, ...`.
"""
from m3_memory.core.scene.colmap import (
    Alignment,
    ColmapCamera,
    ColmapImage,
    ColmapModel,
    align_to_scene,
    colmap_intrinsics,
    frame_id_of,
    import_colmap,
    read_colmap_model,
)
from m3_memory.core.scene.format import (
    INDEX_FILE,
    META_FILE,
    POINTS_FILE,
    SCENE_FORMAT_VERSION,
    Frame,
    Scene,
    SceneError,
    SceneMeta,
    ScenePoints,
    SceneWriter,
    encode_depth,
    save_png_atomic,
    write_points,
)
from m3_memory.core.scene.init import INIT_METHODS, init_points_from_colmap, init_points_from_depth, initial_points

__all__ = [
    "Alignment", "ColmapCamera", "ColmapImage", "ColmapModel", "align_to_scene", "colmap_intrinsics", "frame_id_of",
    "import_colmap", "read_colmap_model",
    "INDEX_FILE", "META_FILE", "POINTS_FILE", "SCENE_FORMAT_VERSION", "Frame", "Scene", "SceneError", "SceneMeta",
    "ScenePoints", "SceneWriter", "encode_depth", "save_png_atomic", "write_points",
    "INIT_METHODS", "init_points_from_colmap", "init_points_from_depth", "initial_points",
]
