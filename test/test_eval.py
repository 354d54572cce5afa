"""Evaluation (issue #8): metric functions on hand-made inputs, `evaluate` on a short M3 training of the tiny scene with
held-out views, `m3 eval`, and the feature-distillation baseline trained, saved, loaded and evaluated the same way."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_command
from m3_memory.core.checkpoint import load_memory
from m3_memory.core.pipeline import load_train_config, scene_features
from m3_memory.core.distill import train_distilled
from m3_memory.core.eval import (
    DISTRACTOR_CAPTIONS,
    evaluate,
    feature_fidelity,
    grounding_summary,
    held_out_views,
    load_ground_truth,
    mask_overlap,
    recall_at_k,
    report_markdown,
)
from m3_memory.core.losses import psnr
from m3_memory.core.memory import FeatureDecoder
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import train
from m3_memory.core.views import Camera
from m3_memory.sim import demo_scene

HOLDOUT_EVERY = 4   # the tiny scene's 6 views: 0 and 4 held out, 1, 2, 3, 5 trained on
MODEL = "m3-tinyvlm"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "tiny"
    shutil.copytree(demo_scene("tiny"), root, ignore=shutil.ignore_patterns("bag", "previews"))
    scene = Scene.load(root)
    return root, scene, scene_features(scene, root, [MODEL])


def short_config(iterations: int):
    return load_train_config(None, {"iterations": iterations, "holdout_every": HOLDOUT_EVERY,
                                    "densify": {"refine_start_iter": 100, "refine_every": 50}})


@pytest.fixture(scope="module")
def m3(tiny):
    root, scene, features = tiny
    path = root / "m3.pt"
    memory = train(scene, features, short_config(300), path)
    return memory, path, evaluate(scene, memory, features)


@pytest.fixture(scope="module")
def distilled(tiny):
    root, scene, features = tiny
    path = root / "distill.pt"
    return train_distilled(scene, features, short_config(100), path), path


def test_metrics_on_hand_made_masks_and_similarities():
    predicted = np.zeros((4, 4), bool)
    predicted[:2, :2] = True                      # 4 pixels
    truth = np.zeros((4, 4), bool)
    truth[:2, :] = True                           # 8 pixels, containing the prediction
    assert mask_overlap(predicted, truth) == (4, 8)
    summary = grounding_summary([4, 6, 0], [8, 10, 5])      # IoUs 0.5, 0.6, 0
    assert summary["pairs"] == 3
    assert summary["miou"] == pytest.approx(1.1 / 3) and summary["ciou"] == pytest.approx(10 / 23)
    assert summary["p50"] == pytest.approx(2 / 3) and summary["p60"] == pytest.approx(1 / 3)
    assert grounding_summary([], []) == {"pairs": 0}

    similarity = torch.tensor([[0.9, 0.1, 0.5],    # right answer (0) ranked 1st
                               [0.9, 0.1, 0.5],    # right answer (2) ranked 2nd
                               [0.9, 0.5, 0.1]])   # right answer (2) ranked 3rd
    positives = torch.tensor([[True, False, False], [False, False, True], [False, False, True]])
    assert recall_at_k(similarity, positives, (1, 2, 3)) == pytest.approx({"r1": 1 / 3, "r2": 2 / 3, "r3": 1.0})
    two_right = torch.tensor([[False, True, True]] * 3)   # the best-ranked right candidate counts
    assert recall_at_k(similarity, two_right, (1, 2))["r2"] == pytest.approx(1.0)

    raw = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])   # last row: no feature, ignored
    assert feature_fidelity(raw, raw) == (pytest.approx(0.0), pytest.approx(0.0), 2)
    cosine, l2, rows = feature_fidelity(-raw, raw)
    assert (cosine, rows) == (pytest.approx(2.0), 2) and l2 == pytest.approx(3.0)   # (2 + 4) / 2


def test_held_out_views_follow_the_trainer_convention():
    assert held_out_views(10, 4).tolist() == [0, 4, 8]
    assert held_out_views(5, 0).tolist() == [0, 1, 2, 3, 4]


def test_m3_report_on_held_out_views_is_sane(m3, tiny):
    memory, _, report = m3
    root, scene, _ = tiny
    assert len(memory.views) == 4                      # trained on the four non-held-out views only
    assert report["method"] == "m3" and report["views"]["evaluated"] == [0, 4] and report["views"]["held_out"]
    images = torch.from_numpy(scene.images()[[0, 4]]).float() / 255
    blank = np.mean([psnr(torch.zeros_like(image), image) for image in images])
    assert report["rgb"]["psnr"] > blank + 5 and 0 < report["rgb"]["ssim"] <= 1

    fidelity = report["features"][MODEL]
    assert 0 <= fidelity["cosine_distance"] < 0.5 and fidelity["l2"] > 0 and fidelity["views"] == 2

    grounding = report["grounding"][MODEL]
    assert grounding["pairs"] >= 3                            # each of the three objects seen in some held-out view
    for key in ("miou", "ciou", "p50", "p60"):
        assert 0 <= grounding[key] <= 1
    assert grounding["p60"] <= grounding["p50"]
    assert all(0 <= iou <= 1 for iou in grounding["per_object"].values())

    retrieval = report["retrieval"][MODEL]
    assert retrieval["texts"] == 3 + len(DISTRACTOR_CAPTIONS) and retrieval["regions"] == grounding["pairs"]
    for kind in ("rendered", "raw"):
        for way in ("i2t", "t2i"):
            r = retrieval[kind][way]
            assert 0 <= r["r1"] <= r["r5"] <= r["r10"] <= 1

    localisation = report["localisation"][MODEL]
    assert len(localisation["per_object"]) == 3
    best = min(min(e for e in (row["rendered_error_m"], row["direct_3d_error_m"]) if e is not None)
               for row in localisation["per_object"])
    assert best <= 0.05, localisation["per_object"]          # at least one object found within 5 cm
    assert max(localisation["rendered"]["success_rate"], localisation["direct_3d"]["success_rate"]) > 0

    cost = report["cost"]
    assert cost["parameters"] == memory.num_parameters() and cost["bank_sizes"] == memory.bank_sizes()
    assert cost["train_s"] > 0 and cost["render_ms_mean"] > 0 and cost["locate_ms_mean"] > 0
    assert cost["locate_views"] == 4 and report["notes"] == []
    json.dumps(report)                                        # the report is plain JSON
    assert "| PSNR |" in report_markdown(report)


def test_without_holdout_every_view_is_evaluated_and_noted(m3, tiny):
    memory, _, _ = m3
    _, scene, _ = tiny
    all_views = dataclasses.replace(memory, config={**memory.config, "holdout_every": 0})
    report = evaluate(scene, all_views, features=None, text_encoders={})
    assert report["views"]["evaluated"] == list(range(6)) and not report["views"]["held_out"]
    assert any("training-view" in note for note in report["notes"])
    assert any("no raw features" in note for note in report["notes"])
    assert report["features"] == {} and report["grounding"] == {} and report["localisation"] == {}
    assert "none held out" in report_markdown(report)


def test_ground_truth_of_the_demo_scene(tiny):
    _, scene, _ = tiny
    truth = load_ground_truth(scene)
    assert truth.phrases == ["yellow bath duck", "cat", "yellow ball"]
    assert len(truth.masks) == len(scene) and truth.masks[0].shape == (120, 160)
    assert set(np.unique(np.concatenate([m.ravel() for m in truth.masks]))) <= {0, 1, 2, 3}


def test_m3_eval_cli_writes_json_and_markdown(m3, tmp_path):
    _, path, _ = m3
    scene_dir = path.parent
    out = tmp_path / "report"
    result = run_command("m3", "eval", str(scene_dir), str(path), "--out", str(out), timeout=300, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["method"] == "m3" and summary["held_out"] and summary["views"] == 2
    report = json.loads((out / "eval.json").read_text())
    assert report["checkpoint"] == str(path) and MODEL in report["features"] and MODEL in report["grounding"]
    markdown = (out / "eval.md").read_text()
    assert "held-out views" in markdown and "cosine distance" in markdown
    plot = out / "localisation.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary["plot"] == str(plot)
    assert "![3D localisation](localisation.png)" in markdown   # the report embeds its plot

    missing = run_command("m3", "eval", str(scene_dir), str(tmp_path / "none.pt"))
    assert missing.returncode == 1 and "checkpoint at" in missing.stderr


def test_distillation_baseline_trains_saves_loads_and_evaluates(distilled, tiny):
    memory, path = distilled
    _, scene, features = tiny
    loaded, state = load_memory(path)                         # M3's checkpoint format, resumable like M3
    assert state is not None and loaded.config["method"] == "distill" and loaded.config["decoder"] == {"hidden": 64}
    assert loaded.models == [MODEL] and loaded.bank_sizes() == {}
    decoder = loaded.attentions[MODEL]
    assert isinstance(decoder, FeatureDecoder) and decoder.dims == (16, 64, 128)
    decoder_params = 16 * 64 + 64 + 64 * 128 + 128
    gaussian_params = sum(p.numel() for p in loaded.gaussians.parameters())
    assert loaded.num_parameters() == gaussian_params + decoder_params == memory.num_parameters()
    camera = Camera(scene.c2w[0], scene.Ks[0], 160, 120)
    before = memory.render(camera, [MODEL]).features[MODEL]
    after = loaded.render(camera, [MODEL]).features[MODEL]
    torch.testing.assert_close(after, before)

    report = evaluate(scene, loaded, features)
    assert report["method"] == "distill" and report["views"]["evaluated"] == [0, 4]
    assert report["cost"]["bank_sizes"] == {} and report["cost"]["iterations"] == 100
    assert 0 <= report["features"][MODEL]["cosine_distance"] < 1
    assert 0 <= report["grounding"][MODEL]["miou"] <= 1
    assert len(report["localisation"][MODEL]["per_object"]) == 3
