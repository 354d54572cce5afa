"""`ros2 action ...` of the venv front end, graph listings, and `m3 train-remote`, against the real bringup (recorder,
trainer, memory server as separate processes over DDS)."""
import json
import re
import shutil
import signal
import subprocess

import pytest
import yaml

from conftest import VENV_BIN, listed, ros2_launch, run_command, wait_for
from m3_memory.ros.interfaces import import_interface
from m3_memory.sim import demo_scene

# A training this long is still running when the test cancels it.
ENDLESS = "iterations: 100000"


# The bringup is up once every node and what each offers are listed (the recorder's too: the tests list it).
READY = {
    ("node", "list"): {"/recorder", "/trainer", "/memory_server"},
    ("action", "list"): {"/m3/train"},
    ("service", "list"): {"/m3/locate", "/m3/recorder/start", "/m3/recorder/stop"},
}


@pytest.fixture(scope="module")
def bringup(tmp_path_factory):
    """`ros2 launch m3_bringup scan_and_grasp.launch.py` in a folder holding the tiny scene as scans/tiny, every node
    up."""
    cwd = tmp_path_factory.mktemp("bringup")
    shutil.copytree(demo_scene("tiny"), cwd / "scans" / "tiny", ignore=shutil.ignore_patterns("bag", "previews"))
    with ros2_launch("m3_bringup", "scan_and_grasp.launch.py", cwd=cwd):
        ready = wait_for(lambda: all(names <= listed(*command) for command, names in READY.items()), timeout=120)
        assert ready, (cwd / "launch.log").read_text()
        yield cwd


def printed(text: str, after: str, before: str = "\nGoal finished") -> dict:
    """The message ros2cli-style output prints after `after` (its first line indented, as ros2cli does)."""
    return yaml.safe_load(text.split(after, 1)[1].split(before, 1)[0].strip())


def started(command: list[str], cwd, output):
    return subprocess.Popen([str(VENV_BIN / command[0]), *command[1:]], cwd=cwd, stdout=output,
                            stderr=subprocess.STDOUT, text=True)


def test_action_types_of_an_actions_own_topics():
    assert import_interface("m3_msgs/action/Train_FeedbackMessage").__name__ == "Train_FeedbackMessage"
    assert import_interface("m3_msgs/action/Train_SendGoal").Request().get_fields_and_field_types()["goal_id"]
    with pytest.raises(ImportError, match="no interface named 'Train_Nothing'"):
        import_interface("m3_msgs/action/Train_Nothing")


def test_graph_listings_are_complete_and_the_same_each_time(bringup):
    expected = {
        ("node", "list"): {"/recorder", "/trainer", "/memory_server"},
        ("topic", "list"): {"/m3/memory_status", "/m3/recorder/status", "/m3/checkpoint", "/camera/color/image_raw",
                            "/m3/grasp_target", "/tf"},
        ("service", "list"): {"/m3/locate", "/m3/recorder/start", "/m3/recorder/stop"},
    }
    for command, names in expected.items():
        listings = [run_command("ros2", *command, check=True).stdout.split() for _ in range(3)]
        assert names <= set(listings[0]), (command, listings[0])
        assert listings[1] == listings[0] and listings[2] == listings[0], (command, listings)
        assert not any("/_action/" in name for name in listings[0])    # hidden, as ros2cli hides them
    hidden = run_command("ros2", "topic", "list", "--include-hidden-topics", check=True).stdout.split()
    assert {"/m3/train/_action/feedback", "/m3/train/_action/status"} <= set(hidden)


def test_action_list_and_info(bringup):
    assert "/m3/train [m3_msgs/action/Train]" in run_command("ros2", "action", "list", "-t", check=True).stdout
    info = run_command("ros2", "action", "info", "/m3/train", check=True).stdout
    # clients: whatever else in this test session holds one; the one server is the trainer
    assert info.startswith("Action: /m3/train\nAction clients: ") and "Action servers: 1\n    /trainer\n" in info
    assert "Action servers: 1" in run_command("ros2", "action", "info", "m3/train", "-c", check=True).stdout


def test_send_goal_that_cannot_run_prints_the_reason(bringup):
    result = run_command("ros2", "action", "send_goal", "/m3/train", "m3_msgs/action/Train", "{scene_dir: /etc}",
                         check=True)
    out = result.stdout
    assert out.startswith("Waiting for an action server to become available...\nSending goal:\n     scene_dir: /etc")
    assert re.search(r"^Goal accepted with ID: [0-9a-f]{32}$", out, re.M), out
    result_yaml = printed(out, "Result:\n")
    assert result_yaml["success"] is False and "outside the configured roots" in result_yaml["message"]
    assert out.rstrip().endswith("Goal finished with status: ABORTED")


def test_send_goal_mistakes(bringup):
    bad = run_command("ros2", "action", "send_goal", "/m3/train", "m3_msgs/action/Train", "{scene_dirr: x}")
    assert bad.returncode == 2 and "no field 'scene_dirr'" in bad.stderr
    absent = run_command("ros2", "action", "send_goal", "/m3/nothing", "m3_msgs/action/Train", "{}", "--timeout", "1")
    assert absent.returncode == 1 and "action /m3/nothing is not available after 1 s" in absent.stderr
    untyped = run_command("ros2", "action", "send_goal", "/m3/nothing", "{}", "--timeout", "1")
    assert untyped.returncode == 1 and "give its type" in untyped.stderr


def test_send_goal_with_feedback_trains_and_the_server_loads_it(bringup, tmp_path):
    echo_log = open(tmp_path / "echo.txt", "w")
    echo = started(["ros2", "topic", "echo", "/m3/train/_action/feedback", "--once"], bringup, echo_log)
    try:
        result = run_command("ros2", "action", "send_goal", "/m3/train", "m3_msgs/action/Train",
                             "{scene_dir: scans/tiny, output: goal.pt, config_overrides: 'iterations: 20'}",
                             "--feedback", timeout=600, check=True)
        echo.wait(timeout=30)
    finally:
        if echo.poll() is None:
            echo.kill()
        echo_log.close()
    out = result.stdout
    feedback = [yaml.safe_load(block.split("\n\n")[0].strip()) for block in out.split("Feedback:\n")[1:]]
    assert feedback and feedback[-1]["total_iterations"] == 20 and feedback[-1]["iteration"] == 20
    outcome = printed(out, "Result:\n")
    assert outcome["success"] is True and outcome["checkpoint"] == str(bringup.resolve() / "memories" / "goal.pt")
    assert out.rstrip().endswith("Goal finished with status: SUCCEEDED")
    # The feedback topic's type (m3_msgs/action/Train_FeedbackMessage) was looked up on the graph and printed
    echoed = yaml.safe_load((tmp_path / "echo.txt").read_text().split("---")[0])
    assert set(echoed) == {"goal_id", "feedback"} and "total_iterations" in echoed["feedback"]

    def served():
        status = yaml.safe_load(run_command("ros2", "topic", "echo", "/m3/memory_status", "--once").stdout
                                .split("---")[0])
        return status["loaded"] and status["checkpoint"] == outcome["checkpoint"]

    assert wait_for(served, timeout=120, interval=1.0)


def test_train_remote_progress_and_result(bringup):
    result = run_command("m3", "train-remote", "scans/tiny", "--set", "iterations=20", "log_every=5",
                         "--output", "remote.pt", "--json", timeout=600, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["success"] and report["status"] == "SUCCEEDED" and report["iterations"] == 20
    assert report["checkpoint"] == str(bringup.resolve() / "memories" / "remote.pt") and report["gaussians"] > 0
    bar = result.stderr.replace("\r", "\n")
    assert "training: 100%" in bar and "20/20" in bar     # drawn from the goal's feedback
    refused = run_command("m3", "train-remote", "/etc", timeout=120)
    assert refused.returncode == 1 and "aborted: goal refused" in refused.stderr and "outside" in refused.stderr


@pytest.mark.parametrize("command", [
    ["m3", "train-remote", "scans/tiny", "--set", ENDLESS.replace(": ", "="), "--output", "cancelled.pt"],
    ["ros2", "action", "send_goal", "/m3/train", "m3_msgs/action/Train",
     f"{{scene_dir: scans/tiny, output: cancelled.pt, config_overrides: '{ENDLESS}'}}", "--feedback"],
], ids=["train-remote", "send_goal"])
def test_ctrl_c_cancels_the_goal(bringup, tmp_path, command):
    output = tmp_path / "output.txt"
    with open(output, "w") as sink:
        client = started(command, bringup, sink)
        try:
            # training has begun once the feedback counts iterations
            assert wait_for(lambda: re.search(r"training:.*[1-9]\d*/100000|iteration: [1-9]", output.read_text()),
                            timeout=300, interval=0.5), output.read_text()
            client.send_signal(signal.SIGINT)
            assert client.wait(timeout=120) == 130, output.read_text()
        finally:
            if client.poll() is None:
                client.kill()
    text = output.read_text()
    if command[0] == "m3":
        assert "cancelling the training" in text and "canceled: " in text
    else:
        # (feedback that arrives meanwhile is printed between the two lines, as with ros2cli)
        assert "\nCanceling goal...\n" in text and text.rstrip().endswith("Goal canceled.")
    assert not (bringup / "memories" / "cancelled.pt").exists()
    # the trainer is free again: a short goal runs to its end
    after = run_command("m3", "train-remote", "scans/tiny", "--set", "iterations=2", "--output", "after.pt", "--json",
                        timeout=600, check=True)
    assert json.loads(after.stdout.strip().splitlines()[-1])["success"]
