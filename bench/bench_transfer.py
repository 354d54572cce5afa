"""Scan transfer over ROS on localhost (issue #14): throughput, peak memory of both ends, time from stop to training.

    python bench/bench_transfer.py [--synthetic-mb 1024] [--skip-live] [--out bench/results/transfer]

A real recorder (the source, `output_root` = the robot's scans) and a real trainer (the client, its own storage root)
run as separate processes over DDS. Each scan is pulled by a Train goal naming its id (`iterations: 1`: training is not
what is measured); the throughput is the trainer's own figure (bytes / seconds of the pull, from its result message).
Peak RSS: each process's VmRSS sampled at 20 Hz from the goal until the pull ends (the `features` feedback), with its
value before the goal beside it (the trainer's includes torch). Scans: the demo scene (generated once, cached) and a
synthetic one: the tiny scene plus `--synthetic-mb` of random bytes in 64 MB files (random: nothing compresses).
The live case records the tiny bag through the recorder with the goal sent right after start, so keyframes flow during
the scan; it reports the time from the stop service's answer to the first `features` feedback (training started).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, machine_info, write_report  # bench/machine.py  # noqa: E402

VENV_BIN = Path(sys.prefix) / "bin"
FETCHED = re.compile(r"fetched scan \S+: ([\d.]+) MB in (\d+) files \(([\d.]+) MB held already\) in ([\d.]+) s")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples the VmRSS of some processes at 20 Hz while active."""

    def __init__(self, pids: dict[str, int]):
        self.pids, self.peak, self.before = pids, {}, {}
        self._stop = threading.Event()

    def __enter__(self):
        self.before = {name: rss_mb(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.before)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def done(self):
        """Stop sampling (the pull ended: what follows is training)."""
        self._stop.set()

    def _run(self):
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def start(executable: str, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / executable), *args], stdout=open(log, "w"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def pull(node, client, scan_id: str, pids: dict[str, int]) -> dict:
    """Send a goal for `scan_id`, return the pull's figures (trainer's result message) and the peak RSS."""
    import rclpy
    from m3_msgs.action import Train

    with PeakRss(pids) as rss:
        future = client.send_goal_async(Train.Goal(scan_id=scan_id, config_overrides="{iterations: 1}"),
                                        feedback_callback=lambda m: m.feedback.stage == "features" and rss.done())
        rclpy.spin_until_future_complete(node, future, timeout_sec=30)
        result = future.result().get_result_async()
        rclpy.spin_until_future_complete(node, result, timeout_sec=1800)
    message = result.result().result.message
    match = FETCHED.search(message)
    if not match:
        raise SystemExit(f"no transfer figures in the result: {message}")
    mb, files, seconds = float(match[1]), int(match[2]), float(match[4])
    return {"scan": scan_id, "mb": mb, "files": files, "seconds": seconds, "mb_per_s": round(mb / seconds, 1),
            "rss_mb_before": {k: round(v) for k, v in rss.before.items()},
            "rss_mb_peak": {k: round(v) for k, v in rss.peak.items()}, "trained": result.result().result.success}


def live(node, client, tiny: Path) -> dict:
    """Record the tiny bag with a goal sent at start; seconds from the stop's answer to the training's start."""
    import rclpy
    from m3_msgs.action import Train
    from std_srvs.srv import Trigger

    from m3_memory.ros.graph_client import call_service

    started = call_service(Trigger, "/m3/recorder/start", Trigger.Request(), timeout=30)
    scan_id = Path(started.message).name
    feedback = []
    future = client.send_goal_async(Train.Goal(scan_id=scan_id, config_overrides="{iterations: 1}"),
                                    feedback_callback=lambda m: feedback.append((time.monotonic(), m.feedback)))
    rclpy.spin_until_future_complete(node, future, timeout_sec=30)
    player = subprocess.run([str(VENV_BIN / "m3"), "play", str(tiny / "bag"), "--rate", "1"], capture_output=True)
    if player.returncode:
        raise SystemExit(f"m3 play failed: {player.stderr.decode()[-500:]}")
    deadline = time.monotonic() + 1.0   # take the feedback that arrived while the bag played
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    fetched_during = max((f.bytes_done for _, f in feedback if f.stage == "fetching"), default=0)
    stopped = call_service(Trigger, "/m3/recorder/stop", Trigger.Request(), timeout=60)
    stop_answered = time.monotonic()
    result = future.result().get_result_async()
    rclpy.spin_until_future_complete(node, result, timeout_sec=600)
    training = next((t for t, f in feedback if f.stage == "features"), None)
    return {"scan": scan_id, "stop": stopped.message, "bytes_fetched_before_stop": fetched_during,
            "bytes_total": max((f.bytes_total for _, f in feedback), default=0),
            "stop_to_training_s": None if training is None else round(training - stop_answered, 2),
            "trained": result.result().result.success, "message": result.result().result.message}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-mb", type=int, default=1024, help="size of the synthetic scan's random payload")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer")
    args = parser.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))
    from m3_memory.sim import demo_scene

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench_transfer_"))
    scans = work / "robot" / "scans"
    tiny = demo_scene("tiny")
    cases = []
    if not args.skip_demo:
        shutil.copytree(demo_scene("demo"), scans / "scan_demo", ignore=shutil.ignore_patterns("bag", "previews"))
        cases.append("scan_demo")
    if args.synthetic_mb:
        synthetic = scans / "scan_synthetic"
        shutil.copytree(tiny, synthetic, ignore=shutil.ignore_patterns("bag", "previews"))
        (synthetic / "payload").mkdir()
        for i in range(0, args.synthetic_mb, 64):
            (synthetic / "payload" / f"{i // 64:04d}.bin").write_bytes(os.urandom(min(64, args.synthetic_mb - i) << 20))
        cases.append("scan_synthetic")
    recorder = start("m3_recorder", "--ros-args", "-p", f"output_root:={scans}", log=work / "recorder.log")
    trainer = start("m3_trainer", "--ros-args", "-p", f"storage_root:={work / 'worker'}", log=work / "trainer.log")
    import rclpy
    from m3_msgs.action import Train
    from rclpy.action import ActionClient

    rclpy.init()
    node = rclpy.create_node("bench_transfer")
    results = {"machine": info, "pulls": [], "live": None}
    try:
        client = ActionClient(node, Train, "m3/train")
        if not client.wait_for_server(timeout_sec=60):
            raise SystemExit("no /m3/train")
        pids = {"recorder": recorder.pid, "trainer": trainer.pid}
        for scan_id in cases:
            results["pulls"].append(pull(node, client, scan_id, pids))
            print(results["pulls"][-1], flush=True)
        if not args.skip_live:
            results["live"] = live(node, client, tiny)
            print(results["live"], flush=True)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop(trainer)
        stop(recorder)
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_at_end"] = os.getloadavg()
    lines = [f"# Scan transfer over ROS (localhost)\n\n{describe(info)}; load average at end "
             f"{tuple(round(x, 2) for x in results['load_average_at_end'])}.\n",
             "| scan | MB | files | s | MB/s | recorder RSS MB before → peak | trainer RSS MB before → peak |",
             "|---|---|---|---|---|---|---|"]
    for p in results["pulls"]:
        lines.append(f"| {p['scan']} | {p['mb']:.1f} | {p['files']} | {p['seconds']:.1f} | {p['mb_per_s']} | "
                     f"{p['rss_mb_before']['recorder']} → {p['rss_mb_peak']['recorder']} | "
                     f"{p['rss_mb_before']['trainer']} → {p['rss_mb_peak']['trainer']} |")
    if results["live"]:
        lv = results["live"]
        lines.append(f"\nLive scan of the tiny bag, goal sent at start: {lv['bytes_fetched_before_stop'] / 1e6:.2f} of "
                     f"{lv['bytes_total'] / 1e6:.2f} MB fetched before stop; stop → training started in "
                     f"{lv['stop_to_training_s']} s ({lv['stop']}).")
    write_report(args.out, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
