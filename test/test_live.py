"""Live mode (issue #15 part 2) through the real nodes: `ros2 launch ... live:=true`, the tiny bag replayed slowly into
the recorder. The trainer follows the recorder by itself (no goal), the memory server serves a memory built from the
first keyframes while the scan still records, the stop ends with a final refinement whose memory holds every kept
keyframe, and the answer meets test_demo's tolerance; a `m3 train-remote --live` sent during that scan follows the
trainer's own job (one job, trained once), and a live goal that follows it can cancel it. Also: a `base_memory` goal
updates a memory through the action, a job's feature extractors are built once, and the launch file refuses
malformed live arguments."""
import importlib.util
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import yaml
from action_msgs.msg import GoalStatus
from m3_msgs.action import Train
from m3_msgs.msg import MemoryStatus
from m3_msgs.srv import Locate
from rclpy.action import ActionClient
from std_srvs.srv import Trigger

from conftest import REPO, VENV_BIN, node_process, ros2_launch, wait_for
from test_demo import CONFUSED, TOLERANCE_M
from m3_memory.core.checkpoint import load_memory
from m3_memory.ros.graph_client import call_service
from m3_memory.ros.qos import LATCHED
from m3_memory.sim import demo_scene

QUERY = "yellow bath duck"
# The tiny bag is one second of a 30 Hz camera; replayed 40 times slower the scan records for about 40 s, so
# keyframes keep arriving after the first memory (4 keyframes, 100 iterations) is served.
PLAY_RATE = 0.025
LIVE = {"live_min_views": 4, "live_first_iterations": 100, "live_update_iterations": 60,
        "live_final_iterations": 300}


def launch_module():
    spec = importlib.util.spec_from_file_location("scan_and_grasp",
                                                  REPO / "m3_bringup" / "launch" / "scan_and_grasp.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argument, message", [
    ({"live": "sometimes"}, "live:='sometimes' must be true or false"),
    ({"publish_every_s": "soon"}, "publish_every_s:='soon' must be a number"),
    ({"publish_every_s": "-1"}, "publish_every_s:='-1' must be at least 0"),
])
def test_malformed_live_arguments_are_refused(argument, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        launch_module().node_descriptions({**argument, "config_dir": str(REPO / "m3_bringup" / "config")})


def test_live_arguments_reach_the_trainer():
    nodes = launch_module().node_descriptions({"live": "true", "publish_every_s": "3",
                                               "config_dir": str(REPO / "m3_bringup" / "config")})
    trainer = next(n for n in nodes if n["name"] == "trainer")
    assert trainer["parameters"][1] == {"use_sim_time": False, "live": True, "publish_every_s": 3.0}


def live_config(folder, live: dict):
    """m3_bringup's config with the trainer's live settings `live`; the recorder waits longer for the slowed bag's
    transforms (its 10 Hz odometry arrives every 4 s at PLAY_RATE)."""
    shutil.copytree(REPO / "m3_bringup" / "config", folder)
    for name, values in (("trainer", live), ("recorder", {"wait_seconds": 6.0})):
        data = yaml.safe_load((folder / f"{name}.yaml").read_text())
        data["/**"]["ros__parameters"].update(values)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_live_scan_is_served_while_it_records_and_refined_at_its_end(ros_node, tmp_path):
    config = live_config(tmp_path / "config", LIVE)
    statuses: list[tuple[float, MemoryStatus]] = []   # (monotonic time received, status)
    ros_node.create_subscription(MemoryStatus, "/m3/memory_status",
                                 lambda msg: statuses.append((time.monotonic(), msg)), LATCHED)
    log_path = tmp_path / "launch.log"

    def spin(seconds=0.1):
        rclpy.spin_once(ros_node, timeout_sec=seconds)

    with ros2_launch("m3_bringup", "scan_and_grasp.launch.py", "live:=true", "publish_every_s:=2",
                     f"config_dir:={config}", cwd=tmp_path):
        try:
            start = call_service(Trigger, "/m3/recorder/start", Trigger.Request(), timeout=90)
            assert start.success, start.message
            scan = start.message
            play = subprocess.Popen([str(VENV_BIN / "m3"), "play", str(demo_scene("tiny") / "bag"), "--rate",
                                     str(PLAY_RATE), "--wait-for", "/camera/color/image_raw"], cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            # a client asking for the scan the trainer already trains live: it follows that job
            assert wait_for(lambda: "queued a live job" in log_path.read_text(), timeout=60)
            client = subprocess.Popen([str(VENV_BIN / "m3"), "train-remote", "--live", "--json"], cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # keep the scan recording until a memory of it is served (the whole bag has played by then, or not)
            assert wait_for(lambda: spin() or any(s.loaded for _, s in statuses), timeout=240), \
                log_path.read_text()[-4000:]
            assert wait_for(lambda: spin() or play.poll() is not None, timeout=180), "the bag replay did not end"
            assert play.returncode == 0, play.stdout.read()
            stopped_at = time.monotonic()
            stop = call_service(Trigger, "/m3/recorder/stop", Trigger.Request(), timeout=60)
            kept = re.match(r"kept (\d+) of \d+ frames into (\S+);", stop.message)
            assert stop.success and kept and kept.group(2) == scan, stop.message
            kept = int(kept.group(1))

            # the stop ends with the final refinement; then the goal-less live job ends
            final_line = "live: published"
            assert wait_for(lambda: f"({kept} views, final)" in log_path.read_text(), timeout=300), \
                log_path.read_text()[-4000:]
            final_at = time.monotonic()
            memory_path = tmp_path / "memories" / f"{scan.rsplit('/', 1)[-1]}.pt"

            def final_served():
                spin()
                return any(t >= final_at - 5 and s.loaded and s.num_views == kept for t, s in statuses)

            assert wait_for(final_served, timeout=120), [(s.message, s.num_views) for _, s in statuses]
            # give the server the final announcement's load before asking
            time.sleep(2)
            spin()
            found = call_service(Locate, "/m3/locate", Locate.Request(query=QUERY), timeout=60)
            out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
    text = log_path.read_text()
    assert text.count("queued a live job") == 1 and "follows the live job" in text, text[-4000:]
    # one job, trained once: the client's result is that job's, its publications are the log's
    assert client.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    published = re.match(rf"live: {kept} views in \d+ steps, (\d+) memories published$", report["message"])
    assert report["success"] and published and report["checkpoint"] == str(memory_path), report
    assert int(published.group(1)) == text.count(final_line) and text.count(f"({kept} views, final)") == 1
    assert "refining" in err and "served" in err and "views" in err   # the job's feedback reached the client

    served_live = [s for t, s in statuses if t < stopped_at and s.loaded]
    assert served_live, "no memory was served while the scan recorded"
    first = served_live[0]
    assert first.checkpoint == str(memory_path) and first.sources == [scan]
    assert LIVE["live_min_views"] <= first.num_views < kept, (first.num_views, kept)
    assert first.bank_sizes and first.num_gaussians > 0
    memory, _ = load_memory(memory_path)
    assert sum(len(entry["views"]) for entry in memory.sources) == kept == len(memory.views.c2w)

    assert found.success, found.message
    point = np.array([found.target.point.x, found.target.point.y, found.target.point.z])
    truth = {o["phrases"][0]: np.asarray(o["center"])
             for o in json.loads((demo_scene("tiny") / "objects.json").read_text())["objects"]}
    errors = [np.linalg.norm(point - truth[name]) for name in (QUERY, CONFUSED[QUERY])]
    assert min(errors) < TOLERANCE_M, (point, errors)


def test_a_live_goal_following_the_trainers_own_job_cancels_it(ros_node, tmp_path):
    """With live:=true, a live goal for the scan being recorded attaches to the job the trainer queued for it: it gets
    that job's feedback, and its cancel ends the job (no second job ever queued)."""
    config = live_config(tmp_path / "config", LIVE)
    log_path = tmp_path / "launch.log"
    feedback = []
    with ros2_launch("m3_bringup", "scan_and_grasp.launch.py", "live:=true", f"config_dir:={config}", cwd=tmp_path):
        start = call_service(Trigger, "/m3/recorder/start", Trigger.Request(), timeout=90)
        assert start.success, start.message
        assert wait_for(lambda: "queued a live job" in log_path.read_text(), timeout=60), log_path.read_text()
        client = ActionClient(ros_node, Train, "m3/train")
        assert client.wait_for_server(timeout_sec=60)
        sent = client.send_goal_async(Train.Goal(scan_id=start.message, live=True),
                                      feedback_callback=lambda m: feedback.append(m.feedback))
        rclpy.spin_until_future_complete(ros_node, sent, timeout_sec=30)
        handle = sent.result()
        assert handle.accepted
        # no bag plays: the job waits for keyframes, and says so to the goal that follows it
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or any(
            f.stage == "waiting" for f in feedback), timeout=30), feedback
        cancel = handle.cancel_goal_async()
        rclpy.spin_until_future_complete(ros_node, cancel, timeout_sec=30)
        result = handle.get_result_async()
        rclpy.spin_until_future_complete(ros_node, result, timeout_sec=60)
        queue = json.loads((tmp_path / "storage" / "queue.json").read_text())["jobs"]
        time.sleep(3)   # the recorder still records and says so every second: no second job for its scan
    text = log_path.read_text()
    assert result.result().status == GoalStatus.STATUS_CANCELED, result.result()
    assert "live training cancelled" in result.result().result.message
    assert "follows the live job" in text and text.count("queued a live job") == 1, text[-4000:]
    assert queue == [] and "live: published" not in text   # the job ended with its cancel, having trained nothing


def test_a_jobs_extractors_are_built_once_and_reused_as_its_scan_grows(tmp_path, monkeypatch):
    from m3_memory.core.features import registry
    from m3_memory.core.pipeline import Extractors, scene_features
    from m3_memory.core.scene import INDEX_FILE, Scene

    scan = tmp_path / "scan"
    shutil.copytree(demo_scene("tiny"), scan, ignore=shutil.ignore_patterns("bag", "previews"))
    lines = (scan / INDEX_FILE).read_text().splitlines(keepends=True)
    (scan / INDEX_FILE).write_text("".join(lines[:3]))   # the scan as it records: its first keyframes
    built = []
    real = registry.build_extractor
    monkeypatch.setattr(registry, "build_extractor", lambda name, **kw: built.append(name) or real(name, **kw))

    extractors = Extractors(["m3-tinyvlm"], device="cpu")
    first = extractors.scene_features(Scene.load(scan), scan)["m3-tinyvlm"]
    (scan / INDEX_FILE).write_text("".join(lines))       # more keyframes arrived
    grown = extractors.scene_features(Scene.load(scan), scan)["m3-tinyvlm"]
    assert built == ["m3-tinyvlm"] and extractors.extractor("m3-tinyvlm") is extractors.extractor("m3-tinyvlm")
    assert len(first.maps) == 3 and len(grown.maps) == len(lines) and grown.identity == first.identity
    for old, new in zip(first.maps, grown.maps):
        assert np.array_equal(old, new)
    once = scene_features(Scene.load(scan), scan, ["m3-tinyvlm"], device="cpu")["m3-tinyvlm"]   # built for the call
    assert built == ["m3-tinyvlm"] * 2
    assert all(np.array_equal(a, b) for a, b in zip(grown.maps, once.maps))


def test_a_base_memory_goal_updates_that_memory_into_a_new_one(tiny_memory, ros_node, tmp_path):
    scene_root, memory_path, base = tiny_memory
    memories = tmp_path / "memories"
    memories.mkdir()
    shutil.copy(memory_path, memories / "base.pt")
    with node_process("m3_trainer", "--ros-args", "-p", f"scene_roots:=[{scene_root.parent}]",
                      "-p", f"output_root:={memories}", "-p", f"storage_root:={tmp_path / 'storage'}"):
        client = ActionClient(ros_node, Train, "m3/train")
        assert client.wait_for_server(timeout_sec=60)
        results, feedback = {}, []
        for name, goal in (
                ("refused", Train.Goal(scene_dir=str(scene_root), base_memory="../base.pt", output="x.pt")),
                ("same", Train.Goal(scene_dir=str(scene_root), base_memory="base.pt", output="base.pt")),
                ("updated", Train.Goal(scene_dir=str(scene_root), base_memory="base.pt", output="updated.pt",
                                       config_overrides="{update: {iterations: 20}, log_every: 5}"))):
            future = client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback))
            rclpy.spin_until_future_complete(ros_node, future, timeout_sec=30)
            result = future.result().get_result_async()
            rclpy.spin_until_future_complete(ros_node, result, timeout_sec=300)
            results[name] = result.result().result
    assert not results["refused"].success and "outside the configured roots" in results["refused"].message
    assert not results["same"].success and "is the base memory" in results["same"].message
    answer = results["updated"]
    assert answer.success, answer.message
    assert answer.checkpoint == str(memories / "updated.pt") and answer.iterations == base.iteration + 20
    updated, state = load_memory(memories / "updated.pt")
    assert state is not None and [s["source"] for s in updated.sources] == [str(scene_root), str(scene_root)]
    assert len(updated.views.c2w) == 2 * len(base.views.c2w)
    assert any(f.stage == "updating" and f.views_in_memory == len(base.views.c2w) for f in feedback)
    last = next(f for f in feedback if f.memories_published)   # feedback of the update's publication
    assert last.memories_published == 1 and last.views_in_memory == len(updated.views.c2w)
    assert list(last.bank_models) == ["m3-tinyvlm"] and list(last.bank_sizes) == [updated.bank_sizes()["m3-tinyvlm"]]
    assert 0 <= last.memory_age_seconds < 60


def test_train_remote_live_pulls_the_scan_while_it_records(ros_node, tmp_path):
    """`m3 train-remote --live` without a scan: the goal names the scan being recorded, the trainer pulls it through
    the transfer as it grows (a scan goal) and publishes memories of it before the stop."""
    config = live_config(tmp_path / "config", {"live_min_views": 3, "live_first_iterations": 30,
                                              "live_update_iterations": 20, "live_final_iterations": 40})
    statuses: list[tuple[float, MemoryStatus]] = []
    ros_node.create_subscription(MemoryStatus, "/m3/memory_status",
                                 lambda msg: statuses.append((time.monotonic(), msg)), LATCHED)
    with ros2_launch("m3_bringup", "scan_and_grasp.launch.py", "publish_every_s:=0", f"config_dir:={config}",
                     cwd=tmp_path):
        start = call_service(Trigger, "/m3/recorder/start", Trigger.Request(), timeout=90)
        assert start.success, start.message
        play = subprocess.Popen([str(VENV_BIN / "m3"), "play", str(demo_scene("tiny") / "bag"), "--rate",
                                 str(PLAY_RATE), "--wait-for", "/camera/color/image_raw"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = subprocess.Popen([str(VENV_BIN / "m3"), "train-remote", "--live", "--json"], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or any(s.loaded for _, s in statuses),
                        timeout=240), (tmp_path / "launch.log").read_text()[-4000:]
        assert wait_for(lambda: rclpy.spin_once(ros_node, timeout_sec=0.1) or play.poll() is not None, 180)
        stopped_at = time.monotonic()
        stop = call_service(Trigger, "/m3/recorder/stop", Trigger.Request(), timeout=60)
        assert stop.success, stop.message
        out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    scan_id = start.message.rsplit("/", 1)[-1]
    pulled = tmp_path / "storage" / "default" / "scans" / scan_id
    assert report["success"] and report["message"].startswith("live: ") and "fetched scan" in report["message"]
    assert report["checkpoint"] == str(tmp_path / "storage" / "default" / "memories" / f"{scan_id}.pt")
    kept = int(re.match(r"kept (\d+) of", stop.message).group(1))
    assert (pulled / "frames.jsonl").read_bytes() == (Path(start.message) / "frames.jsonl").read_bytes()
    served_live = [s for t, s in statuses if t < stopped_at and s.loaded]
    assert served_live and served_live[0].checkpoint == report["checkpoint"] and served_live[0].num_views < kept
    assert "refining" in err and "served" in err and "views" in err   # the progress: stages and the memory


def test_base_memory_and_update_settings_are_checked_before_a_job_runs(tiny_memory, tmp_path):
    from m3_memory.core.errors import M3Error
    from m3_memory.core.storage import Storage
    from m3_memory.ros.trainer import plan_goal

    scene_root, memory_path, _ = tiny_memory
    storage = Storage(tmp_path / "storage")
    held = storage.memory_path("robot1", "scan_a")
    held.parent.mkdir(parents=True)
    shutil.copy(memory_path, held)
    (tmp_path / "memories").mkdir()
    (tmp_path / "memories" / "notes.pt").write_text("not a memory")

    def plan(**fields):
        return plan_goal(Train.Goal(scene_dir=str(scene_root), **fields), [scene_root.parent], tmp_path / "memories",
                         None, storage)

    job = plan(robot="robot1", base_memory="scan_a", config_overrides="{update: {iterations: 7}}")
    assert job.base_memory == held and job.update.iterations == 7 and not job.live
    for fields, message in (({"base_memory": "scan_b", "robot": "robot1"}, "is not there"),
                            ({"base_memory": "notes.pt"}, "not a m3-memory/2 memory"),
                            ({"base_memory": "../x.pt"}, "outside the configured roots"),
                            ({"config_overrides": "{update: {iterations: 7}}"}, "live and base_memory goals only"),
                            ({"base_memory": "scan_a", "robot": "robot1", "config_overrides": "{update: {bogus: 1}}"},
                             "unknown training settings ['update.bogus']")):
        with pytest.raises(M3Error, match=re.escape(message)):
            plan(**fields)
    # a live scan may have no frame yet: its directory need not exist
    live = plan_goal(Train.Goal(scene_dir=str(scene_root.parent / "scan_recording"), live=True), [scene_root.parent],
                     tmp_path / "memories", None, storage)
    assert live.live and live.output == tmp_path / "memories" / "scan_recording.pt"
