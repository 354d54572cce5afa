"""The project's main end-to-end test: `m3 demo` replays the demo robot's bag through the live bringup (recorder,
trainer, memory server as separate processes over DDS), trains a memory of the recorded scan and locates every object."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_command
from m3_memory.sim import demo_scene

# A short CI training (300 iterations of the tiny scan) is less sharp than the default schedule: the test's tolerance.
TOLERANCE_M = 0.08
# m3-tinyvlm (the offline stand-in for CLIP) does not reliably tell the yellow duck from the small yellow ball on the
# tiny scene, a layout it was not trained on (its raw features rank each above the other objects in only half to three
# quarters of the views there; the #5 notes give the figures): for those two the answer must land on one of them.
CONFUSED = {"yellow bath duck": "yellow ball", "yellow ball": "yellow bath duck"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    result = run_command("m3", "demo", "--json", "--workdir", str(workdir),
                         "--set", "scene_size=tiny", "train_overrides.iterations=300", timeout=900)
    log = (workdir / "m3_demo_nodes.log").read_text() if (workdir / "m3_demo_nodes.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- nodes ---\n{log[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1]), workdir


def test_demo_json_reports_every_object(demo_run):
    report, _ = demo_run
    assert set(report) >= {"objects", "train_s", "locate_ms_mean", "locate_ms_p95"}
    truth = {o["phrases"][0]: o["center"] for o in json.loads((demo_scene("tiny") / "objects.json").read_text())["objects"]}
    assert [row["query"] for row in report["objects"]] == list(truth)
    for row in report["objects"]:
        assert set(row) == {"query", "target", "truth", "error_m", "success", "picture"}
        picture = np.asarray(Image.open(row["picture"]))   # the answer's view with its heatmap, beside the JSON
        assert picture.shape == (120, 160, 3) and picture.std() > 5
        assert np.allclose(row["truth"], truth[row["query"]], atol=1e-4)
        assert len(row["target"]) == 3
        assert row["error_m"] == pytest.approx(np.linalg.norm(np.subtract(row["target"], row["truth"])), abs=2e-4)
    assert report["train_s"] > 0 and 0 < report["locate_ms_mean"] <= report["locate_ms_p95"]


def test_bag_replay_locates_objects_within_tolerance(demo_run):
    report, _ = demo_run
    truth = {row["query"]: np.asarray(row["truth"]) for row in report["objects"]}
    for row in report["objects"]:
        if row["query"] in CONFUSED:
            other = np.linalg.norm(np.subtract(row["target"], truth[CONFUSED[row["query"]]]))
            assert min(row["error_m"], other) < TOLERANCE_M, row
        else:
            assert row["error_m"] < TOLERANCE_M, row


def test_recorder_kept_and_counted_frames(demo_run):
    report, workdir = demo_run
    frames = report["frames"]
    assert frames["kept"] >= 6 and sum(frames["reasons"].values()) == frames["rejected"]
    # every frame that arrived was kept or rejected for a reason; dropped ones never arrived
    assert frames["seen"] == frames["kept"] + frames["rejected"] - frames["reasons"].get("dropped", 0)
    assert report["scene_dir"].startswith(str(workdir))  # the recorder's scans go below the nodes' working directory
