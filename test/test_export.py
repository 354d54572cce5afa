"""Exports and pictures (issue #16) on a short training of the tiny scene: the .ply reads back (plyfile) in the 3DGS
layout with the checkpoint's values, its semantic and query variants, the point cloud for PointCloud2, and the overlay
picture of a query marks pixels inside the object's ground-truth mask."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from plyfile import PlyData
from scipy import ndimage

from m3_memory.core.engine import QueryEngine
from m3_memory.core.export import export_ply, point_cloud, relevancy_colours, semantic_colours
from m3_memory.core.gaussians import rgb_to_sh0
from m3_memory.core.pictures import OUTLINE_RGB, save_answer_pictures
from m3_memory.core.scene import Scene

PHRASE = "yellow bath duck"


@pytest.fixture(scope="module")
def tiny(tiny_memory):
    root, _, memory = tiny_memory
    return root, memory, QueryEngine(memory)


def test_ply_reads_back_in_the_3dgs_layout(tiny, tmp_path):
    root, memory, _ = tiny
    p = {name: value.detach().cpu().numpy() for name, value in memory.gaussians.params.items()}
    vertex = PlyData.read(str(export_ply(memory, tmp_path / "memory.ply")))["vertex"]
    n, rest = len(p["means"]), p["shN"].shape[1]
    assert vertex.count == n == len(memory.gaussians)
    names = [prop.name for prop in vertex.properties]
    assert names == (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                     + [f"f_rest_{i}" for i in range(3 * rest)] + ["opacity", "scale_0", "scale_1", "scale_2",
                                                                   "rot_0", "rot_1", "rot_2", "rot_3"])
    column = lambda *keys: np.stack([vertex[k] for k in keys], axis=1)  # noqa: E731
    np.testing.assert_allclose(column("x", "y", "z"), p["means"], rtol=1e-6)
    np.testing.assert_allclose(column("f_dc_0", "f_dc_1", "f_dc_2"), p["sh0"][:, 0], rtol=1e-6)
    # f_rest is channel-major: red's coefficients first
    np.testing.assert_allclose(column(*[f"f_rest_{i}" for i in range(rest)]), p["shN"][:, :, 0], rtol=1e-6)
    np.testing.assert_allclose(vertex["opacity"], p["opacities"], rtol=1e-6)
    np.testing.assert_allclose(column("scale_0", "scale_1", "scale_2"), p["scales"], rtol=1e-6)
    quats = p["quats"] / np.linalg.norm(p["quats"], axis=1, keepdims=True)
    np.testing.assert_allclose(column("rot_0", "rot_1", "rot_2", "rot_3"), quats, rtol=1e-5, atol=1e-6)


def test_semantic_and_query_variants_colour_the_gaussians(tiny, tmp_path):
    _, memory, engine = tiny
    semantic = semantic_colours(engine.features)
    assert semantic.shape == (len(memory.gaussians), 3) and semantic.min() >= 0 and semantic.max() <= 1
    assert semantic.std(axis=0).min() > 0.05          # three components that vary over the scene
    vertex = PlyData.read(str(export_ply(memory, tmp_path / "semantic.ply", semantic)))["vertex"]
    dc = np.stack([vertex[f"f_dc_{i}"] for i in range(3)], axis=1)
    np.testing.assert_allclose(dc, rgb_to_sh0(torch.from_numpy(semantic).float()).numpy(), rtol=1e-5, atol=1e-5)
    assert all(np.all(vertex[p.name] == 0) for p in vertex.properties if p.name.startswith("f_rest"))

    answer = engine.answer(PHRASE)
    colours = relevancy_colours(answer.gaussian_scores)
    best, worst = np.argmax(answer.gaussian_scores), np.argmin(answer.gaussian_scores)
    assert colours[best, 0] > 0.8 and colours[best, 2] < 0.2        # red end of the ramp
    assert colours[worst, 2] > 0.4 and colours[worst, 0] < 0.2      # blue end
    with pytest.raises(Exception, match="colours must be"):
        export_ply(memory, tmp_path / "bad.ply", colours[:10])


def test_point_cloud_is_decimated_and_coloured(tiny):
    _, memory, _ = tiny
    full, tenth = point_cloud(memory), point_cloud(memory, decimation=10)
    assert full.xyz.dtype == np.float32 and full.xyz.shape[1] == 3 and full.rgb.shape == full.xyz.shape
    assert len(tenth.xyz) == (len(full.xyz) + 9) // 10
    np.testing.assert_array_equal(tenth.xyz, full.xyz[::10])
    assert 0 <= full.rgb.min() and full.rgb.max() <= 1
    with pytest.raises(Exception, match="decimation"):
        point_cloud(memory, decimation=0)


def test_overlay_picture_outlines_the_object_inside_its_mask(tiny, tmp_path):
    root, memory, engine = tiny
    objects = json.loads((root / "objects.json").read_text())["objects"]
    duck = next(obj for obj in objects if obj["name"] == PHRASE)
    scene = Scene.load(root)
    # the training view where the duck's ground-truth mask is largest
    masks = [np.asarray(Image.open(root / "masks" / f"{frame.frame_id}.png")) == duck["index"] for frame in scene.frames]
    view = int(np.argmax([m.sum() for m in masks]))
    camera = engine.views.camera(view)
    answer = engine.answer(PHRASE, view=camera)
    assert answer.heatmap is not None and answer.mask.any()
    path = save_answer_pictures(answer, memory.render(answer.heatmap_camera).rgb, tmp_path, "duck")
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[:2] == answer.heatmap.shape
    outline = np.all(picture == OUTLINE_RGB, axis=-1)
    assert outline.sum() >= 8
    # what the picture outlines (filled in) covers most of the duck's ground-truth pixels and not the whole table
    marked, truth = ndimage.binary_fill_holes(outline), masks[view]
    assert marked.shape == truth.shape
    assert (marked & truth).sum() > 0.5 * truth.sum()
    assert marked.sum() < 6 * truth.sum()
    assert save_answer_pictures(type(answer)(**{**answer.__dict__, "heatmap": None}), None, tmp_path, "x") is None
