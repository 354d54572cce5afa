"""`m3 train` and `m3 query` run the engine from the command line on a scene directory."""
import json
import shutil
from pathlib import Path

from conftest import run_command
from m3_memory.sim import demo_scene


def test_train_then_query(tmp_path):
    scene = tmp_path / "tiny"
    shutil.copytree(demo_scene("tiny"), scene, ignore=shutil.ignore_patterns("bag", "previews"))
    trained = run_command("m3", "train", str(scene), "--set", "iterations=30", "log_every=10", timeout=600, check=True)
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 30 and summary["gaussians"] > 1000
    assert summary["bank_sizes"]["m3-tinyvlm"] > 1 and (scene / "memory.pt").is_file()
    assert list((scene / "features").iterdir())  # the feature cache was filled on the way

    # 30 iterations teach the memory little: the meaning floor (test_engine's business) is off here
    answer = json.loads(run_command("m3", "query", str(scene / "memory.pt"), "yellow bath duck", "--min-relevancy", "0",
                                    "--save", str(tmp_path / "pics"), check=True).stdout.strip().splitlines()[-1])
    assert answer["picture"] == str(tmp_path / "pics" / "yellow_bath_duck.png") and Path(answer["picture"]).is_file()
    assert answer["frame_id"] == "world" and len(answer["target"]) == 3 and 0 < answer["score"] <= 1

    empty = run_command("m3", "query", str(scene / "memory.pt"), "   ")
    assert empty.returncode == 1 and "query is empty" in empty.stderr
    missing = run_command("m3", "query", str(tmp_path / "none.pt"), "duck")
    assert missing.returncode == 1 and "no memory checkpoint" in missing.stderr
    nothing = run_command("m3", "query", str(scene / "memory.pt"), "🦆")
    assert nothing.returncode == 1 and "no letters or digits" in nothing.stderr
    swallowed = run_command("m3", "train", "--set", "iterations=3", str(scene))
    assert swallowed.returncode == 2 and "positional arguments go before --set" in swallowed.stderr
    bad = run_command("m3", "train", str(scene), "--set", "iterationz=3")
    assert bad.returncode != 0 and "unknown training settings" in bad.stderr
