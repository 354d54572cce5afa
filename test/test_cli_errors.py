"""A user's mistake in any `m3` verb is one clear line and an exit code, never a traceback: 2 for a wrong command line
(what argparse checks), 1 for a job that cannot run (missing or bad files, unknown settings, nothing to talk to)."""
import subprocess
import sys

import pytest

from conftest import run_command
from m3_memory.sim import SIZES, demo_scene

MISSING = "/nonexistent/m3_test"


def cases(tmp):
    """(argv, exit code, text stderr must contain) for each known mistake."""
    scene = str(demo_scene("tiny"))     # read only: every case fails before anything is written
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    return [
        (["m3", "features", MISSING], 1, f"{MISSING} is not a scene directory"),
        (["m3", "demo-scene", "--out", str(tmp / "full"), "--size", "tiny"], 1, "exists and is not empty"),
        (["m3", "demo-scene", "--out", str(tmp / "new"), "--size", "huge"], 2, "unknown scene size 'huge'"),
        (["m3", "train", scene, "--set", "iterationz=3"], 1, "unknown training settings ['iterationz']; known: "),
        (["m3", "train", scene, "--set", "densify.bogus=1"], 1,
         "unknown training settings ['densify.bogus']; known in densify: "),
        (["m3", "train", scene, "--set", "iterations.x=1"], 1, "iterations must be int, got {'x': 1}"),
        (["m3", "train", "--set", "iterations=3", scene], 2, "positional arguments go before --set"),
        (["m3", "train", MISSING], 1, "is not a scene directory"),
        (["m3", "query", MISSING + ".pt", "duck"], 1, "no memory checkpoint"),
        (["m3", "eval", MISSING, MISSING + ".pt"], 1, "m3 eval: "),
        (["m3", "export", MISSING + ".pt", "--ply", str(tmp / "out.ply")], 1, "m3 export: "),
        (["m3", "view", MISSING + ".pt"], 1, "m3 view: "),
        (["m3", "import-colmap", MISSING, MISSING, "--out", str(tmp / "colmap")], 1, "m3 import-colmap: "),
        (["m3", "play", MISSING], 1, "m3 play: "),
        (["m3", "locate", "duck", "--timeout", "1"], 1, "service /m3/locate is not available after 1 s"),
        (["m3", "train-remote", "--timeout", "1"], 1, "no recorder status on /m3/recorder/status within 1 s"),
        (["m3", "train-remote", "scans/x", "--timeout", "1"], 1, "action /m3/train is not available after 1 s"),
        (["m3", "train-remote", "--namespace", "robot 1"], 1, "'/robot 1' is not a valid ROS namespace"),
        (["m3", "locate", "duck", "--namespace", "robot1", "--timeout", "1"], 1,
         "service /robot1/m3/locate is not available after 1 s"),
        (["m3", "locate", "duck", "--namespace", "9lives"], 1, "'/9lives' is not a valid ROS namespace"),
        (["m3", "train-remote", "--robot", "robot1"], 1, "give --scan ID as well"),
        (["m3", "train-remote", "scans/x", "--scan", "y"], 2, "not allowed with argument"),
        (["m3", "demo", "--set", "bogus=1"], 1, "unknown demo settings ['bogus']"),
        (["m3", "demo", "--set", "train_overrides.densify.bogus=1"], 1, "unknown training settings ['densify.bogus']"),
        (["m3", "demo", "--set", "scene_size.x=1"], 1, "demo setting scene_size must be str"),
        (["m3", "demo", "--config", MISSING + ".yaml"], 1, "m3 demo: "),
        (["m3", "no-such-verb"], 2, "invalid choice: 'no-such-verb'"),
        (["m3", "train"], 2, "the following arguments are required: scene"),
    ]


def test_every_mistake_is_a_message_and_an_exit_code(tmp_path):
    failures = []
    for argv, code, text in cases(tmp_path):
        result = run_command(*argv, timeout=120)
        if result.returncode != code or text not in result.stderr or "Traceback" in result.stderr + result.stdout:
            failures.append(f"{' '.join(argv)} → {result.returncode} (want {code} and {text!r}):\n{result.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_python_m_entry_points_follow_the_same_convention():
    sim = subprocess.run([sys.executable, "-m", "m3_memory.sim", "--size", "huge"], capture_output=True, text=True)
    assert sim.returncode == 2 and "unknown scene size 'huge'" in sim.stderr
    features = subprocess.run([sys.executable, "-m", "m3_memory.cli.features", MISSING], capture_output=True, text=True)
    assert features.returncode == 1 and "is not a scene directory" in features.stderr
    assert "Traceback" not in sim.stderr + features.stderr


def test_size_choices_are_the_generators():
    listed = run_command("m3", "demo-scene", "--size", "huge").stderr
    assert f"choose one of {sorted(SIZES)}" in listed


def test_version():
    result = run_command("m3", "--version", check=True)
    assert result.stdout.startswith("m3-memory ")


@pytest.mark.parametrize("verb", ["train-remote", "demo", "locate", "play"])
def test_ros_verbs_document_themselves(verb):
    assert run_command("m3", verb, "--help", check=True).stdout.startswith(f"usage: m3 {verb}")


def test_help_names_both_ways_of_training():
    text = run_command("m3", "--help", check=True).stdout
    assert "train-remote" in text and "running trainer node" in text
