"""Live mode through the real nodes (issue #15): how long after a keyframe is written does the memory server serve a
memory that holds it, per update, against a batch retrain of the same views in the same run.

    python bench/bench_online.py                          # the demo bag on this machine -> bench/results/online_cpu
    python bench/bench_online.py --rate 0.2 --publish-every 0 --out /tmp/online   # faster replay, every step served

`ros2 launch m3_bringup scan_and_grasp.launch.py live:=true` runs in a scratch folder (the YAML of m3_bringup/config,
the recorder's `wait_seconds` raised for the slowed replay's sparse TF), a scan is started, the scene's bag replayed at
`--rate` and the scan stopped when it ends. The script watches the scan's `frames.jsonl` (a keyframe *arrives* when the
recorder has appended its index line, after its images) and the server's `m3/memory_status` (a memory *serves* frame k
once the server has loaded a memory of ≥ k + 1 views of this scan: the live job adds frames in order). Each step of the
trainer (first memory, updates, final refinement) is read from its log line (views, iterations, seconds). Then the same
views are trained from scratch in this process with the trainer's settings (config/train.yaml: what a batch job
would run for every new keyframe), and every object is located in both memories (direct 3D answer, 5 cm).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from machine import describe, machine_info, write_report  # bench/machine.py (scripts run from bench/ on sys.path)
from bench_train import locate_objects, scripted_objects
from texts import TextCache
from m3_memory.core.checkpoint import load_memory
from m3_memory.core.pipeline import load_train_config, scene_features
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import train

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.prefix) / "bin"
STEP = re.compile(r"live: (\d+) views in memory after (\d+) iterations in ([\d.]+) s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, default=None, help="scene directory with bag/ (default: the demo scene)")
    parser.add_argument("--rate", type=float, default=0.1, help="bag replay speed (0.1: ten times slower than recorded)")
    parser.add_argument("--publish-every", type=float, default=None,
                        help="the trainer's publish_every_s (default: m3_bringup/config/trainer.yaml's)")
    parser.add_argument("--model", default="m3-tinyvlm")
    parser.add_argument("--texts", type=Path, default=None, help="query embeddings cache (bench/texts.py)")
    parser.add_argument("--out", type=Path, default=RESULTS / "online_cpu")
    return parser.parse_args()


class Watch:
    """Arrival times of the scan's keyframes (index lines) and the server's statuses, with monotonic receipt times."""

    def __init__(self):
        self.arrived: list[float] = []              # arrival time of frame k at [k]
        self.statuses: list[tuple[float, int, str]] = []   # (time, views, checkpoint) of each loaded memory
        self.scan: Path | None = None
        self.stop = threading.Event()

    def poll_frames(self) -> None:
        while not self.stop.is_set():
            index = self.scan / "frames.jsonl" if self.scan else None
            if index is not None and index.is_file():
                lines = index.read_bytes().count(b"\n")
                now = time.monotonic()
                self.arrived += [now] * (lines - len(self.arrived))
            time.sleep(0.05)

    def served_at(self, frame: int, checkpoint: str) -> float | None:
        return next((t for t, views, path in self.statuses if path == checkpoint and views > frame), None)


def run_live(scene_dir: Path, args, work: Path, watch: Watch) -> dict:
    """The live run through the nodes; returns the scan, the trainer's steps and the launch log."""
    import rclpy
    from m3_msgs.msg import MemoryStatus
    from std_srvs.srv import Trigger

    from m3_memory.ros.graph_client import call_service
    from m3_memory.ros.qos import LATCHED

    config = work / "config"
    shutil.copytree(REPO / "m3_bringup" / "config", config)
    recorder = yaml.safe_load((config / "recorder.yaml").read_text())
    recorder["/**"]["ros__parameters"]["wait_seconds"] = max(1.0, 0.3 / args.rate)   # odometry: 10 Hz in bag time
    (config / "recorder.yaml").write_text(yaml.safe_dump(recorder))
    log_path = work / "launch.log"
    command = [str(BIN / "ros2"), "launch", "m3_bringup", "scan_and_grasp.launch.py", "live:=true",
               f"config_dir:={config}"]
    if args.publish_every is not None:
        command.append(f"publish_every_s:={args.publish_every}")
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()   # its own: the service calls below spin nodes of the default context meanwhile
    context.init()
    node = rclpy.create_node("bench_online", context=context)
    node.create_subscription(MemoryStatus, "/m3/memory_status", lambda m: m.loaded and watch.statuses.append(
        (time.monotonic(), m.num_views, m.checkpoint)), LATCHED)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    log = open(log_path, "w")
    launch = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        spinner.start()
        start = call_service(Trigger, "/m3/recorder/start", Trigger.Request(), timeout=120)
        assert start.success, start.message
        watch.scan = Path(start.message)
        threading.Thread(target=watch.poll_frames, daemon=True).start()
        subprocess.run([str(BIN / "m3"), "play", str(scene_dir / "bag"), "--rate", str(args.rate), "--wait-for",
                        "/camera/color/image_raw"], cwd=work, check=True, capture_output=True)
        stop = call_service(Trigger, "/m3/recorder/stop", Trigger.Request(), timeout=120)
        stopped = time.monotonic()
        kept = int(re.match(r"kept (\d+) of", stop.message).group(1))
        deadline = time.monotonic() + 3600
        while f"({kept} views, final)" not in log_path.read_text() and time.monotonic() < deadline:
            failed = [line for line in log_path.read_text().splitlines() if "[trainer]" in line and "failed" in line]
            if failed or launch.poll() is not None:
                raise RuntimeError(f"the live job failed: {failed or 'the launch ended'}")
            time.sleep(0.5)
        checkpoint = str(work / "memories" / f"{watch.scan.name}.pt")
        while watch.served_at(kept - 1, checkpoint) is None or watch.statuses[-1][0] < stopped:
            time.sleep(0.5)   # the final memory's load
            if time.monotonic() > deadline:
                raise TimeoutError("the final memory was never served")
        time.sleep(2.0)
        watch.stop.set()
    finally:
        launch.send_signal(2)
        try:
            launch.wait(60)
        except subprocess.TimeoutExpired:
            launch.kill()
        log.close()
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()
        rclpy.try_shutdown()
    text = log_path.read_text()
    steps = [{"views": int(v), "iterations": int(i), "seconds": float(s)} for v, i, s in STEP.findall(text)]
    return {"scan": watch.scan, "kept": kept, "checkpoint": checkpoint, "steps": steps, "stopped": stopped}


def per_step(live: dict, watch: Watch, batch_s: float) -> list[dict]:
    """One row per trainer step: the frames it added, their arrival → served latencies, its compute time."""
    rows, held = [], 0
    for number, step in enumerate(live["steps"]):
        final = number == len(live["steps"]) - 1
        added = range(held, step["views"]) if step["views"] > held else range(0, 0)
        latencies = [watch.served_at(k, live["checkpoint"]) - watch.arrived[k] for k in added
                     if watch.served_at(k, live["checkpoint"]) is not None]
        kind = "first" if number == 0 else "final" if final else "update"
        rows.append({"step": number + 1, "kind": kind, "views": step["views"], "new_views": len(added),
                     "iterations": step["iterations"], "step_s": step["seconds"],
                     "latency_max_s": round(max(latencies), 1) if latencies else None,
                     "latency_mean_s": round(float(np.mean(latencies)), 1) if latencies else None,
                     "step_over_batch": round(step["seconds"] / batch_s, 3)})
        held = max(held, step["views"])
    return rows


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        "# Live mode: keyframe arrival → served memory, against a batch retrain (issue #15)", "",
        f"Machine: {describe(report['machine'])}; load average at the end {report['load_average_at_end']}"
        f" ({report['load_note']}).", "",
        f"Command: `{report['command']}`. The scene's bag replayed at rate {report['rate']} into `ros2 launch m3_bringup "
        f"scan_and_grasp.launch.py live:=true` (recorder, trainer, memory server as processes over DDS); trainer "
        f"settings {report['live_settings']}. {s['kept']} keyframes kept.", "",
        "| step | kind | views in memory | new views | iterations | step s | arrival → served max s | mean s |"
        " step / batch |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["steps"]:
        lines.append(f"| {row['step']} | {row['kind']} | {row['views']} | {row['new_views']} | {row['iterations']} | "
                     f"{row['step_s']:.1f} | {row['latency_max_s'] if row['latency_max_s'] is not None else '-'} | "
                     f"{row['latency_mean_s'] if row['latency_mean_s'] is not None else '-'} | "
                     f"{row['step_over_batch']:.1%} |")
    lines += [
        "", f"Batch retrain of the same {s['kept']} views (config/train.yaml, {s['batch_iterations']} iterations) in "
        f"the same run: {s['batch_s']:.0f} s.", "",
        f"Per update (steps after the first, final included): mean {s['update_s_mean']:.1f} s, max "
        f"{s['update_s_max']:.1f} s = {s['update_over_batch_mean']:.1%} / {s['update_over_batch_max']:.1%} of the batch "
        f"retrain (goal ≤ 25%). Arrival → served over all keyframes: median {s['latency_median_s']:.1f} s, max "
        f"{s['latency_max_s']:.1f} s (goal ≤ 60 s per update); the first memory was served "
        f"{s['first_served_after_start_s']:.0f} s after the first keyframe, "
        f"{s['served_before_stop']} memories before the stop.", "",
        f"Located within 5 cm (direct 3D answer): live memory {s['live_successes']}/{s['objects']}, batch "
        f"{s['batch_successes']}/{s['objects']}.", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from m3_memory.sim import demo_scene

    scene_dir = args.scene or demo_scene("demo")
    machine = machine_info("cpu")
    work = Path(tempfile.mkdtemp(prefix="bench_online_"))
    watch = Watch()
    live = run_live(scene_dir, args, work, watch)

    scan = Scene.load(live["scan"])
    config = load_train_config(None, {})
    features = scene_features(scan, live["scan"], [args.model], device=config.device)
    started = time.monotonic()
    batch = train(scan, features, config, work / "batch.pt")
    batch_s = time.monotonic() - started

    steps = per_step(live, watch, batch_s)
    updates = [row["step_s"] for row in steps[1:]] or [steps[0]["step_s"]]
    latencies = [watch.served_at(k, live["checkpoint"]) - watch.arrived[k] for k in range(live["kept"])]
    objects = scripted_objects(scene_dir)
    texts = TextCache(args.model, args.texts)
    live_memory, _ = load_memory(live["checkpoint"])
    located = {"live": locate_objects(live_memory, args.model, objects, texts),
               "batch": locate_objects(batch, args.model, objects, texts)}
    trainer_yaml = yaml.safe_load((work / "config" / "trainer.yaml").read_text())["/**"]["ros__parameters"]
    summary = {
        "kept": live["kept"], "batch_s": round(batch_s, 1), "batch_iterations": config.iterations,
        "update_s_mean": float(np.mean(updates)), "update_s_max": float(np.max(updates)),
        "update_over_batch_mean": float(np.mean(updates)) / batch_s, "update_over_batch_max": max(updates) / batch_s,
        "latency_median_s": float(np.median(latencies)), "latency_max_s": float(np.max(latencies)),
        "first_served_after_start_s": watch.statuses[0][0] - watch.arrived[0],
        "served_before_stop": sum(1 for t, _, path in watch.statuses if t < live["stopped"]
                                  and path == live["checkpoint"]),
        "objects": len(objects), "live_successes": sum(r["success"] for r in located["live"]),
        "batch_successes": sum(r["success"] for r in located["batch"])}
    load = os.getloadavg()
    report = {
        "machine": machine, "load_average_at_end": tuple(round(x, 2) for x in load),
        "load_note": "shared machine: other jobs ran beside it" if max(machine["load_average_at_start"]) > 1.5
        or load[0] > 2.5 else "quiet machine",
        "command": "python " + " ".join(sys.argv), "rate": args.rate, "scene": str(scene_dir),
        "live_settings": {k: v for k, v in trainer_yaml.items() if k.startswith("live_") or k == "publish_every_s"}
        | ({"publish_every_s": args.publish_every} if args.publish_every is not None else {}),
        "steps": steps, "summary": summary, "located": located,
        "latencies_s": [round(x, 2) for x in latencies]}
    write_report(args.out, json.loads(json.dumps(report, default=str)), markdown(report))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
