"""Online memory (issue #15): a memory trained on part of a scan, extended with the rest by `core.online.update`."""
import copy
import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_command
from m3_memory.core.checkpoint import _encode, _payload, load_memory, save_memory
from m3_memory.core.engine import QueryEngine
from m3_memory.core.errors import QueryError
from m3_memory.core.online import (SceneViews, UpdateConfig, _sampler, append_gaussians, covered_rows, extend_bank,
                                   remove_gaussians, train_config_of, unexplained_points, update)
from m3_memory.core.memory import principal_scene_components
from m3_memory.core.pipeline import load_train_config, scene_features
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import (DensifyConfig, TrainingLoop, ViewFeatures, ViewSet, psc_input, scene_scale, train,
                                    training_views)
from m3_memory.sim import demo_scene


def part(scene: Scene, features: dict, views) -> tuple[Scene, dict]:
    """The scan of only `views` (as if the robot had stopped there): a Scene of those frames and their features."""
    sub = Scene(scene.root, scene.meta, [scene.frames[i] for i in views])
    return sub, {name: ViewFeatures(f.identity, [f.maps[i] for i in views]) for name, f in features.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny scene, its features, and a 100-iteration memory of its first three views (with training state)."""
    root = tmp_path_factory.mktemp("online") / "tiny"
    shutil.copytree(demo_scene("tiny"), root, ignore=shutil.ignore_patterns("bag", "previews"))
    scene = Scene.load(root)
    features = scene_features(scene, root, ["m3-tinyvlm"])
    config = load_train_config(None, {"iterations": 100, "densify": {"refine_start_iter": 40, "refine_every": 20,
                                                                     "refine_stop_iter": 80}})
    path = root.parent / "first.pt"
    train(*part(scene, features, range(3)), config, path)
    return root, scene, features, path


def loaded(path):
    memory, state = load_memory(path)
    return memory, state, train_config_of(memory)


def test_bank_extension_keeps_old_rows_and_appends_only_uncovered_ones(tiny):
    root, scene, features, path = tiny
    memory, _, config = loaded(path)
    attention = memory.attentions["m3-tinyvlm"]
    before = attention.psc.clone()
    rows, psc = psc_input("m3-tinyvlm", features["m3-tinyvlm"], config, [3, 4, 5])
    wm = attention.wm.clone()
    figures = extend_bank(attention, rows, psc)
    after = attention.psc
    assert torch.equal(after[:len(before)], before) and torch.equal(attention.wm, wm)   # old rows never move
    added = after[len(before):]
    assert figures["added"] == len(added) > 0 and figures["bank"] == len(after)
    assert not covered_rows(before, added, psc.threshold).any()           # each was uncovered by the old bank
    input_rows = torch.from_numpy(rows)
    assert all((input_rows == row).all(dim=1).any() for row in added)    # and is one of the new views' rows
    uncovered = input_rows[~covered_rows(before, input_rows, psc.threshold)]
    assert torch.equal(added, principal_scene_components(uncovered, psc).components)
    assert figures["uncovered"] == len(uncovered) < len(rows)
    # batch Algorithm 1 on all six views, for the bank size difference the issue asks to be measured
    all_rows, _ = psc_input("m3-tinyvlm", features["m3-tinyvlm"], config)
    batch = len(principal_scene_components(torch.from_numpy(all_rows), psc).components)
    print(f"bank: first half {len(before)}, incremental {len(after)}, batch on all rows {batch}")
    assert batch <= len(after) <= 3 * batch


def test_seeding_fills_what_the_memory_lacks_and_nothing_it_explains(tiny):
    root, scene, features, path = tiny
    memory, state, config = loaded(path)
    objects = json.loads((root / "objects.json").read_text())["objects"]
    duck = next(o for o in objects if o["name"] == "yellow bath duck")
    lo, hi = np.asarray(duck["bbox_min"]) - 0.02, np.asarray(duck["bbox_max"]) + 0.02
    views = ViewSet.from_scene(scene, features, "cpu")
    trained = [0, 1, 2]
    settings = UpdateConfig(seed_stride=2)
    depths = [scene.depth(i) for i in trained]
    xyz, _ = unexplained_points(memory.gaussians, views, depths, trained, settings)
    candidates = sum(int((d[::2, ::2] > 0).sum()) for d in depths)
    inside = lambda points: np.all((points >= lo) & (points <= hi), axis=1)   # noqa: E731
    assert len(xyz) < 0.1 * candidates, (len(xyz), candidates)   # the views it was trained on are explained
    before, before_duck = len(xyz), int(inside(xyz).sum())
    duck_pixels = sum(int(((np.asarray(Image.open(root / "masks" / f"{scene.frames[i].frame_id}.png")) == duck["index"])
                           & (d > 0))[::2, ::2].sum()) for i, d in zip(trained, depths))

    loop = TrainingLoop(memory.gaussians, memory.attentions, config, scene_scale(scene.c2w), config.densify, state)
    remove_gaussians(loop, torch.from_numpy(inside(memory.gaussians.means.numpy())))   # the duck is gone
    xyz, rgb = unexplained_points(memory.gaussians, views, depths, trained, settings)
    duck_seeds = int(inside(xyz).sum())
    print(f"unexplained: {before} pixels ({before_duck} on the duck) of {candidates}; without the duck's Gaussians "
          f"{len(xyz)} ({duck_seeds} on the duck, whose mask has {duck_pixels})")
    assert duck_seeds >= 0.5 * duck_pixels and duck_seeds >= 3 * max(before_duck, 10)   # seeds where it has nothing
    assert duck_seeds - before_duck >= 0.5 * (len(xyz) - before)                          # ... and mostly there
    assert rgb[inside(xyz)].mean(0)[2] < rgb[inside(xyz)].mean(0)[0]   # in the duck's colour: yellow, not blue


def test_append_and_remove_keep_the_moments_of_the_other_gaussians(tiny):
    _, scene, _, path = tiny
    memory, state, config = loaded(path)
    loop = TrainingLoop(memory.gaussians, memory.attentions, config, scene_scale(scene.c2w), config.densify, state)
    params = loop.model.params
    n = len(memory.gaussians)
    moments = {name: copy.deepcopy(loop.optimizers[name].state[p]) for name, p in params.items()}
    assert all(m["exp_avg_sq"].abs().sum() > 0 for m in moments.values())   # trained: non-zero moments
    new = {name: torch.randn(7, *p.shape[1:]) for name, p in params.items()}
    append_gaussians(loop, new)
    assert len(memory.gaussians) == n + 7
    for name, p in params.items():
        state_now = loop.optimizers[name].state[p]
        assert loop.optimizers[name].param_groups[0]["params"][0] is p
        assert torch.equal(p[n:], new[name]) and torch.equal(state_now["step"], moments[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_now[key][:n], moments[name][key])
            assert not state_now[key][n:].any()
    for key in ("grad2d", "count"):
        if loop.strategy_state.get(key) is not None:
            assert len(loop.strategy_state[key]) == n + 7
    drop = torch.zeros(n + 7, dtype=torch.bool)
    drop[::3] = True
    remove_gaussians(loop, drop)
    assert len(memory.gaussians) == n + 7 - int(drop.sum())
    kept = ~drop[:n]
    for name, p in params.items():
        assert torch.equal(loop.optimizers[name].state[p]["exp_avg"][:int(kept.sum())], moments[name]["exp_avg"][kept])


def test_untrusted_pixels_teach_nothing(tiny):
    """Training on a view whose left half is untrusted (ViewSet.masks) ends the same whatever its image and features
    show there; without the mask it does not. A view without a trusted pixel is never sampled."""
    _, scene, features, path = tiny
    width = scene.meta.width
    feats = features["m3-tinyvlm"]
    assert width % 2 == 0 and feats.maps[0].shape[1] % 2 == 0   # the left half of the map is the image's
    base = ViewSet.from_scene(scene, features, "cpu")
    rng = np.random.default_rng(0)
    other = ViewSet(base.images.clone(), base.c2w, base.Ks, {"m3-tinyvlm": ViewFeatures(feats.identity, [
        np.concatenate([rng.normal(size=m[:, :m.shape[1] // 2].shape).astype(m.dtype), m[:, m.shape[1] // 2:]],
                       axis=1) for m in feats.maps])})
    other.images[:, :, :width // 2] = torch.rand_like(other.images[:, :, :width // 2])
    masks = torch.ones(base.images.shape[:3], dtype=torch.bool)
    masks[:, :, :width // 2] = False

    def trained(views: ViewSet) -> dict:
        memory, state, config = loaded(path)
        loop = TrainingLoop(memory.gaussians, memory.attentions, config, scene_scale(scene.c2w), config.densify, state)
        loop.run(range(3), lambda: (views, 4), np.random.default_rng(1))
        return {name: p.detach().clone() for name, p in memory.gaussians.params.items()}

    same = [trained(views) for views in (base, other)]
    assert not all(torch.equal(same[0][k], same[1][k]) for k in same[0])   # unmasked, the left half matters
    base.masks, other.masks = masks, masks.clone()
    masked = [trained(views) for views in (base, other)]
    assert all(torch.equal(masked[0][k], masked[1][k]) for k in masked[0])
    masks[2] = False
    sample = _sampler((base, np.array([4])), [(base, np.arange(3))], 0.5, np.random.default_rng(0))
    assert {sample()[1] for _ in range(200)} == {0, 1, 4}


def test_update_round_trip_records_its_scans(tiny, tmp_path):
    root, scene, features, path = tiny
    memory, state, config = loaded(path)
    n_before, bank_before = len(memory.gaussians), memory.bank_sizes()["m3-tinyvlm"]
    steps = []
    out = update(memory, state, SceneViews(scene, features, np.arange(3, 6), "scan-2"),
                 [SceneViews(scene, features, np.arange(3), str(root))], config,
                 UpdateConfig(iterations=30), tmp_path / "updated.pt", callback=lambda p: steps.append(p.iteration))
    assert steps == [30] and out.iteration == 130
    figures = out.sources[-1]["update"]
    assert figures["seeded"] > 0 and out.bank_sizes()["m3-tinyvlm"] > bank_before
    assert figures["gaussians_before"] == n_before and figures["gaussians"] == len(out.gaussians)
    again, again_state = load_memory(tmp_path / "updated.pt")
    assert [s["source"] for s in again.sources] == [str(root), "scan-2"]
    assert again.sources[1]["views"] == [3, 4, 5]
    assert again.sources[1]["frame_ids"] == [scene.frames[i].frame_id for i in (3, 4, 5)]
    assert len(again.views) == 6 and len(again.gaussians) == len(out.gaussians)
    n = len(again.gaussians)
    assert all(again_state["optimizers"][name]["state"][0]["exp_avg"].shape[0] == n for name in again.gaussians.params)
    # files written before provenance load with no sources
    payload = _payload(again, None)
    del payload["sources"]
    (tmp_path / "old.pt").write_bytes(_encode(payload))
    assert load_memory(tmp_path / "old.pt")[0].sources == []


def test_m3_update_cli(tiny, tmp_path):
    root, scene, features, path = tiny
    memory = tmp_path / "memory.pt"
    shutil.copy(path, memory)
    result = run_command("m3", "update", str(memory), str(root), "--set", "update.iterations=10", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["replayed"] == 1 and summary["scans"] == 2 and summary["checkpoint"] == str(memory)
    assert load_memory(memory)[0].iteration == 110
    # a recorded scan that no longer exists: the update runs without its replay, and says so
    again, state = load_memory(memory)
    again.sources[0]["source"] = str(tmp_path / "gone")
    save_memory(memory, again, state)
    result = run_command("m3", "update", str(memory), str(root), "--set", "update.iterations=5",
                         "--output", str(tmp_path / "next.pt"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["replayed"] == 1
    assert f"{tmp_path / 'gone'} (recorded scan of this memory) is missing" in result.stdout
    result = run_command("m3", "update", str(memory), str(root), "--set", "update.new_view_share=2")
    assert result.returncode == 1 and "new_view_share" in result.stderr


def test_split_scan_update_matches_a_batch_retrain(tmp_path):
    """Issue #15's split test on the `halves` scan (sim SIZES): in time order, its first half of the keyframes never
    sees the duck and its second half does (test_sim checks it). A memory of the first half, updated with the second
    half replaying the first, against a batch retrain on all views; views 0, 4, 8 are held out of all trainings.
    The update path spends 200 + 200 iterations to the batch's 300 (at 150 + 150 the update's held-out PSNR was
    0.91 of the batch's: its first memory is then too rough, and the update prunes 39% of it as seen through)."""
    from m3_memory.core.eval import evaluate

    root = tmp_path / "halves"
    shutil.copytree(demo_scene("halves"), root, ignore=shutil.ignore_patterns("bag", "previews"))
    scene = Scene.load(root)
    features = scene_features(scene, root, ["m3-tinyvlm"])
    objects = json.loads((root / "objects.json").read_text())["objects"]
    config = load_train_config(None, {"iterations": 300, "holdout_every": 4, "densify": {
        "refine_start_iter": 60, "refine_stop_iter": 240, "refine_every": 30}})
    views = training_views(len(scene), 4)
    first, second = views[views < len(scene) // 2], views[views >= len(scene) // 2]

    started = time.monotonic()
    batch = train(scene, features, config, tmp_path / "batch.pt")
    batch_s = time.monotonic() - started
    started = time.monotonic()
    train(*part(scene, features, first), load_train_config(None, {"iterations": 200, "densify": {
        "refine_start_iter": 40, "refine_stop_iter": 160, "refine_every": 20}}), tmp_path / "first.pt")
    first_s = time.monotonic() - started
    memory, state = load_memory(tmp_path / "first.pt")
    memory.sources[0].update(source=str(root), views=first.tolist())   # the part's views in the whole scan
    first_errors = errors(memory, objects)
    started = time.monotonic()
    updated = update(memory, state, SceneViews(scene, features, second, str(root)),
                     [SceneViews(scene, features, first, str(root))], train_config_of(memory),
                     UpdateConfig(iterations=200, densify=DensifyConfig(refine_start_iter=40, refine_stop_iter=160,
                                                                        refine_every=40)),
                     tmp_path / "updated.pt")
    update_s = time.monotonic() - started
    updated.config["holdout_every"] = 4   # evaluate both on the held-out views 0, 4, 8
    reports = {name: evaluate(scene, m, features) for name, m in (("batch", batch), ("update", updated))}
    found = {name: errors(m, objects) for name, m in (("batch", batch), ("update", updated))}
    fidelity = {k: r["features"]["m3-tinyvlm"]["cosine_distance"] for k, r in reports.items()}
    psnrs = {k: r["rgb"]["psnr"] for k, r in reports.items()}
    print(json.dumps({"batch_s": batch_s, "first_s": first_s, "update_s": update_s,
                      "ratio": (first_s + update_s) / batch_s, "psnr": psnrs, "cosine_distance": fidelity,
                      "first_half_errors": first_errors, "errors": found,
                      "bank": {"batch": batch.bank_sizes(), "update": updated.bank_sizes()},
                      "gaussians": {"batch": len(batch.gaussians), "update": len(updated.gaussians)},
                      "figures": {k: v for k, v in updated.sources[-1]["update"].items() if k != "config"}}))
    near = lambda error: error is not None and error < 0.05   # noqa: E731
    duck = "yellow bath duck"
    assert not near(first_errors[duck]), first_errors                  # the update is what found the duck
    assert all(near(e) for name, e in first_errors.items() if name != duck), first_errors
    assert all(near(e) for e in found["update"].values()), found["update"]
    assert fidelity["update"] <= 1.1 * fidelity["batch"] and psnrs["update"] >= 0.9 * psnrs["batch"]


def errors(memory, objects) -> dict[str, float | None]:
    """Per object, metres from the memory's answer to its first phrase to its true centre; None when nothing in the
    memory matches the phrase (QueryError)."""
    engine = QueryEngine(memory, "m3-tinyvlm")
    found = {}
    for o in objects:
        try:
            found[o["name"]] = float(np.linalg.norm(engine.answer(o["phrases"][0]).point - np.asarray(o["center"])))
        except QueryError:
            found[o["name"]] = None
    return found
