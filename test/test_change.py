"""Change detection (issue #15, part 3): a second scan of the table with one object moved; the Gaussians its views see
through are the old place's, static parts keep theirs, and an update answers the object's new place."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from m3_memory.core.change import ChangeConfig, change_votes, seen_through
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import GaussianModel
from m3_memory.core.scene import Scene
from m3_memory.sim import cli, demo_scene
from m3_memory.sim.world import TABLE_TOP_Z

MOVED = "yellow bath duck"
OFFSET = (0.25, 0.0)   # metres on the table: the issue asks for ≥ 20 cm


def objects(root) -> dict[str, dict]:
    return {o["name"]: o for o in json.loads((root / "objects.json").read_text())["objects"]}


def in_box(means: np.ndarray, obj: dict, pad: float = 0.0) -> np.ndarray:
    """`[N]` bool: `means: [N, 3]` inside the object's ground-truth box grown by `pad` metres."""
    return np.all((means >= np.subtract(obj["bbox_min"], pad)) & (means <= np.add(obj["bbox_max"], pad)), axis=1)


def views_of(root):
    """`(c2w [n, 4, 4], Ks [n, 3, 3], depths [n, H, W], width, height)` of a scene directory, as torch tensors."""
    scene = Scene.load(root)
    return (torch.as_tensor(scene.c2w, dtype=torch.float32), torch.as_tensor(scene.Ks, dtype=torch.float32),
            torch.as_tensor(scene.depths()), scene.meta.width, scene.meta.height)


@pytest.fixture(scope="module")
def moved_scan(tmp_path_factory):
    """The tiny table again, the duck 25 cm along x (the same layout and camera walk)."""
    return demo_scene("tiny", out=tmp_path_factory.mktemp("change") / "moved", moves={MOVED: OFFSET})


# --- the sim scan of a changed place ---------------------------------------------------------------------------------

def test_moved_scan_is_the_same_table_with_one_object_displaced(moved_scan):
    before, after = demo_scene("tiny"), moved_scan
    old, new = objects(before), objects(after)
    assert json.loads((after / "objects.json").read_text())["moves"] == {MOVED: [*OFFSET, 0.0]}
    assert "moves" not in json.loads((before / "objects.json").read_text())
    assert np.allclose(np.subtract(new[MOVED]["center"], old[MOVED]["center"]), [*OFFSET, 0.0], atol=1e-9)
    for key in ("bbox_min", "bbox_max"):
        assert np.allclose(np.subtract(new[MOVED][key], old[MOVED][key]), [*OFFSET, 0.0], atol=1e-9)
    for name in set(old) - {MOVED}:
        assert np.allclose(new[name]["center"], old[name]["center"]) and new[name]["index"] == old[name]["index"]
    scene_a, scene_b = Scene.load(before), Scene.load(after)
    assert [f.frame_id for f in scene_a.frames] == [f.frame_id for f in scene_b.frames]
    assert np.allclose(scene_a.c2w, scene_b.c2w)   # one world frame, the same walk
    # The depth changed where the duck was or is (its ground-truth masks of the two scans), nowhere else.
    index = old[MOVED]["index"]
    for i, frame in enumerate(scene_a.frames):
        changed = np.abs(scene_a.depth(i) - scene_b.depth(i)) > 1e-4
        duck = [np.asarray(Image.open(root / "masks" / f"{frame.frame_id}.png")) == index for root in (before, after)]
        assert changed.any() and not (changed & ~duck[0] & ~duck[1]).any()


def test_move_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="cannot move .*red mug"):
        demo_scene("tiny", out=tmp_path / "a", moves={"red mug": (0.25, 0.0)})
    with pytest.raises(ValueError, match="overlap .*cat photo box"):
        demo_scene("tiny", out=tmp_path / "b", moves={MOVED: (0.3, -0.25)})
    with pytest.raises(ValueError, match="off the table"):
        demo_scene("tiny", out=tmp_path / "c", moves={MOVED: (0.0, 0.5)})
    assert not any(tmp_path.iterdir())   # nothing half-written
    with pytest.raises(SystemExit) as usage:
        cli.main(["--out", str(tmp_path / "d"), "--size", "tiny", "--move", "yellow bath duck:0.25"])
    assert usage.value.code == 2
    assert cli.object_move("yellow bath duck: 0.25, -0.1") == ("yellow bath duck", (0.25, -0.1))
    assert cli.main(["--out", str(tmp_path / "e"), "--size", "tiny", "--move", "cat photo box:0,0.1",
                     "--move", "cat photo box:0,0.2"]) == 1


# --- seen_through on hand-made views: the physics ------------------------------------------------------------------

W = H = 64
K = torch.tensor([[100.0, 0.0, 31.5], [0.0, 100.0, 31.5], [0.0, 0.0, 1.0]])


def gaussians_at(points, opacity=0.9, sigma=0.005) -> GaussianModel:
    points = torch.as_tensor(points, dtype=torch.float32)
    n = len(points)
    params = {"means": points, "scales": torch.full((n, 3), float(np.log(sigma))),
              "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
              "opacities": torch.logit(torch.full((n,), opacity)), "sh0": torch.zeros(n, 1, 3),
              "shN": torch.zeros(n, 0, 3), "queries": torch.zeros(n, 2)}
    return GaussianModel(params, {"m": 2}, 0)


def wall_with_box() -> torch.Tensor:
    """`[H, W]`: a wall 2 m away, a box face 1 m away over pixels [20, 44)², a hole (no depth) at the top left."""
    depth = torch.full((H, W), 2.0)
    depth[20:44, 20:44] = 1.0
    depth[:8, :8] = 0.0
    return depth


def pixel_point(u: float, v: float, z: float) -> list[float]:
    """The camera point (identity pose) at depth `z` whose centre projects into pixel (u, v)."""
    return [(u + 0.5 - 31.5) * z / 100, (v + 0.5 - 31.5) * z / 100, z]


def votes(points, depths, **kwargs):
    model = gaussians_at(points, **{k: kwargs.pop(k) for k in ("opacity", "sigma") if k in kwargs})
    n = len(depths)
    config = ChangeConfig(**kwargs)
    result = change_votes(model, torch.eye(4).repeat(n, 1, 1), K.repeat(n, 1, 1), torch.stack(depths), W, H, config)
    return result.through.tolist(), result.seen.tolist(), result.flagged(config).tolist()


def test_in_front_of_the_wall_is_seen_through_on_the_surface_or_behind_is_not():
    points = [pixel_point(10, 50, 1.0),    # free space: the wall 2 m away is seen behind it
              pixel_point(30, 30, 1.0),    # on the box face
              pixel_point(30, 30, 1.5),    # behind the box face: occluded
              pixel_point(50, 50, 2.02),   # on the wall (within the margin)
              pixel_point(44, 30, 1.0),    # the box's silhouette: its centre pixel sees the wall, its footprint the box
              pixel_point(3, 3, 1.0),      # where the camera has no depth
              pixel_point(80, 30, 1.0),    # outside the image
              [0.0, 0.0, -1.0]]            # behind the camera
    through, seen, flagged = votes(points, [wall_with_box()] * 3)
    assert through == [3, 0, 0, 0, 0, 0, 0, 0]
    assert seen == [0, 3, 0, 3, 0, 0, 0, 0]
    assert flagged == [True] + [False] * 7
    # A transparent Gaussian is invisible, so no view can say it is not there.
    assert votes(points[:1], [wall_with_box()] * 3, opacity=0.01)[2] == [False]
    # Close to a far surface, the relative margin (4 % of 2 m) rules, not the 3 cm one.
    assert votes([pixel_point(50, 50, 1.93)], [wall_with_box()] * 3)[2] == [False]
    assert votes([pixel_point(50, 50, 1.90)], [wall_with_box()] * 3)[2] == [True]


def test_one_bad_view_or_a_split_vote_prunes_nothing():
    on_box = [pixel_point(30, 30, 1.0)]
    glitch = wall_with_box()
    glitch[29:32, 29:32] = 3.0        # one view's depth reads through the box (a reflection)
    assert votes(on_box, [glitch] + [wall_with_box()] * 3) == ([1], [3], [False])   # fewer than min_views
    assert votes(on_box, [glitch] * 2 + [wall_with_box()] * 3)[2] == [False]        # outnumbered by seen views
    assert votes(on_box, [glitch] * 3 + [wall_with_box()] * 3)[2] == [False]        # a tie is no majority
    assert votes(on_box, [glitch] * 3 + [wall_with_box()])[2] == [True]             # the object has gone
    assert votes(on_box, [glitch], min_views=1)[2] == [True]


def test_a_large_gaussian_is_judged_on_its_footprint():
    # Its centre is 6 px off the box face it lies on: a 1 px window sees the wall, its own 1 σ footprint the box.
    point = [pixel_point(49, 30, 1.0)]
    assert votes(point, [wall_with_box()] * 3, sigma=0.002)[2] == [True]
    assert votes(point, [wall_with_box()] * 3, sigma=0.06)[2] == [False]


def test_a_cluster_takes_its_base_along_a_lone_floater_does_not():
    # Nine Gaussians of an object 1 m away, the wall seen 2 m away behind them (a cluster); one of its base, on the
    # floor (rows 54 on, 1 m away) that the views observe; a lone floater before the wall, 3 cm beside a post the
    # views observe (columns 52-56) with a Gaussian on it.
    cluster = [pixel_point(12 + i % 3, 50 + i // 3, 1.0 + 0.002 * i) for i in range(9)]
    base, floater, post = pixel_point(13, 54, 1.0), pixel_point(50, 12, 1.0), pixel_point(53, 12, 1.0)
    depth = wall_with_box()
    depth[54:, :] = 1.0
    depth[8:16, 52:57] = 1.0
    model = gaussians_at(cluster + [base, floater, post])
    args = torch.eye(4).repeat(3, 1, 1), K.repeat(3, 1, 1), torch.stack([depth] * 3), W, H
    through = change_votes(model, *args, ChangeConfig()).flagged(ChangeConfig()).tolist()
    assert through == [True] * 9 + [False, True, False]
    assert seen_through(model, *args, ChangeConfig()).tolist() == [True] * 10 + [True, False]
    assert seen_through(model, *args, ChangeConfig(grow_m=0)).tolist() == through


def test_bad_input_is_refused():
    model = gaussians_at([pixel_point(30, 30, 1.0)])
    with pytest.raises(M3Error, match=r"depths must be \[n, H, W\]"):
        seen_through(model, torch.eye(4)[None], K[None], torch.ones(1, H, W + 1), W, H, ChangeConfig())
    with pytest.raises(M3Error, match="c2w"):
        seen_through(model, torch.eye(4), K[None], torch.ones(1, H, W), W, H, ChangeConfig())
    with pytest.raises(M3Error, match="min_views"):
        ChangeConfig(min_views=0)


# --- a trained memory against its own scan and the moved one --------------------------------------------------------

def test_own_views_see_through_almost_nothing(tiny_memory):
    root, _, memory = tiny_memory
    flagged = seen_through(memory.gaussians, *views_of(root), ChangeConfig()).numpy()
    means = memory.gaussians.means.numpy()
    print(f"own views: {flagged.sum()} of {len(flagged)} Gaussians seen through")
    assert flagged.mean() <= 0.02
    for obj in objects(root).values():   # every object keeps all its Gaussians
        assert not flagged[in_box(means, obj)].any(), obj["name"]


def test_moved_object_old_place_is_seen_through_static_parts_are_not(tiny_memory, moved_scan):
    root, _, memory = tiny_memory
    flagged = seen_through(memory.gaussians, *views_of(moved_scan), ChangeConfig()).numpy()
    means, opacity = memory.gaussians.means.numpy(), memory.gaussians.opacity.numpy()
    old = objects(root)
    # The duck's visible Gaussians, above the table by more than the margin (below it nothing can tell them from it).
    duck = in_box(means, old[MOVED]) & (opacity > 0.1) & (means[:, 2] > TABLE_TOP_Z + ChangeConfig().margin_m)
    static_objects = np.any([in_box(means, o, 0.02) for name, o in old.items() if name != MOVED], axis=0)
    table = ((np.abs(means[:, 2] - TABLE_TOP_Z) < 0.02) & (np.abs(means[:, 0]) < 0.75) & (np.abs(means[:, 1]) < 0.5)
             & ~in_box(means, old[MOVED], 0.02))
    print(f"moved scan: {flagged[duck].sum()}/{duck.sum()} of the duck's old Gaussians flagged, "
          f"{flagged[static_objects].sum()}/{static_objects.sum()} of the other objects', "
          f"{flagged[table].sum()}/{table.sum()} of the table's, {flagged.sum()} in all")
    assert duck.sum() >= 20 and flagged[duck].mean() >= 0.8
    # With its base (grown from the cluster): nearly all of the duck's visible Gaussians.
    assert flagged[in_box(means, old[MOVED]) & (opacity > 0.1)].mean() >= 0.85
    # Around the other objects only a stray floater may go (a faint one in the free space beside the ball is seen
    # through by its own scan too); their visible Gaussians inside their boxes all stay.
    assert flagged[static_objects].mean() <= 0.02
    solid = np.any([in_box(means, o) for name, o in old.items() if name != MOVED], axis=0) & (opacity > 0.1)
    assert solid.sum() >= 50 and not flagged[solid].any()
    assert flagged[table].mean() <= 0.01
    # Away from the old place the moved scan flags no more than scan A itself does (its floaters in free space).
    away = ~in_box(means, old[MOVED], ChangeConfig().grow_m)
    own = seen_through(memory.gaussians, *views_of(root), ChangeConfig()).numpy()
    assert flagged[away].sum() <= own[away].sum() + 5


# --- the test: an update with the moved scan answers the new place ----------------------------------------

def test_update_with_the_moved_scan_answers_the_new_place(tiny_memory, moved_scan, tmp_path):
    """Train on scan A (the fixture), update with scan B (the duck 25 cm away), replaying A's views as an update does
    by default: the answer is within 5 cm of the new place, and no visible Gaussian at the old place (its
    ground-truth box) scores above the query's Otsu threshold. A's views show the duck at the old place and the
    table at the new one; the update does not trust their pixels of the pruned Gaussians (the duck's there) and of
    the new ones A's depth sees through (the new place). Without that, replaying A misses the new place by
    over 5 cm (or cannot answer) in every seed tried."""
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.engine import MIN_OPACITY, QueryEngine
    from m3_memory.core.online import (SceneViews, UpdateConfig, gaussians_where, stale_pixels, train_config_of,
                                       update)
    from m3_memory.core.pipeline import scene_features
    from m3_memory.core.trainer import ViewSet

    root, path, _ = tiny_memory
    memory, state = load_memory(path)     # a copy: the update changes the memory it is given
    scene_a, scene_b = Scene.load(root), Scene.load(moved_scan)
    new = SceneViews(scene_b, scene_features(scene_b, moved_scan, list(memory.models)), np.arange(len(scene_b)),
                     str(moved_scan))
    old = SceneViews(scene_a, scene_features(scene_a, root, list(memory.models)), np.arange(len(scene_a)), str(root))
    # What the update will not trust in A's views, first the pixels of what B sees through: the duck's there.
    pruned = seen_through(memory.gaussians, *views_of(moved_scan), UpdateConfig().change)
    gone = gaussians_where(memory.gaussians, pruned)
    stale = stale_pixels([gone], ViewSet.from_scene(scene_a, {}, "cpu"), old.views, UpdateConfig()).numpy()
    index = objects(root)[MOVED]["index"]
    duck = np.stack([np.asarray(Image.open(root / "masks" / f"{f.frame_id}.png")) == index for f in scene_a.frames])
    print(f"pixels of A stale by pruning: {stale.sum()}, {(stale & duck).sum() / stale.sum():.2f} of them the "
          f"duck's; {(stale & duck).sum() / duck.sum():.2f} of the duck's pixels stale")
    assert (stale & duck).sum() >= 0.95 * duck.sum() and stale.mean() <= 0.25   # A stays mostly trusted
    updated = update(memory, state, new, [old], train_config_of(memory), UpdateConfig(), tmp_path / "updated.pt")

    engine = QueryEngine(updated)
    answer = engine.answer(MOVED)
    before, after = objects(root)[MOVED], objects(moved_scan)[MOVED]
    error = np.linalg.norm(answer.point - after["center"])
    means, opacity = engine.means.numpy(), engine.opacity.numpy()
    old_place = in_box(means, before) & (opacity > MIN_OPACITY)
    matching = old_place & (answer.gaussian_scores > answer.threshold)
    figures = updated.sources[-1].get("update", {})
    print(f"update: answer {error:.3f} m from the new place, {np.linalg.norm(answer.point - before['center']):.3f} m "
          f"from the old; {matching.sum()} of {old_place.sum()} visible Gaussians at the old place above the "
          f"threshold {answer.threshold:.3f}; pruned {figures.get('pruned')}, seeded {figures.get('seeded')}, "
          f"{figures.get('appeared')} seeds appeared since A, {figures.get('stale_pixels')} stale pixels in A's views")
    assert figures["appeared"] >= 10 and figures["stale_pixels"] > stale.sum()   # the new place is stale in A too
    assert error < 0.05
    assert not matching.any()
