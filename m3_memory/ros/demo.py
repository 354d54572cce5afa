"""`m3 demo`: the scripted scan_and_grasp run on the demo robot's bag, end to end, as an operator would do it by hand.

Starts the bringup (`ros2 launch m3_bringup scan_and_grasp.launch.py`: recorder, trainer, memory server), starts a scan,
replays the demo bag into the live graph (`m3 play`), stops the scan, trains a memory of it with the /m3/train action,
waits for the memory server to load it, asks /m3/locate for every object of the scene and prints each target with its
error against the demo's ground truth. With `--json` the last line of output is one JSON object:
`{"objects": [{"query", "target", "truth", "error_m", "success"}], "train_s", "locate_ms_mean", "locate_ms_p95"}`.
Settings: m3_bringup/config/demo.yaml. The nodes run in `--workdir` (default `<cache>/demo_run`, the cache being
`$M3_CACHE_DIR` or `~/.cache/m3_memory`): their log `m3_demo_nodes.log`, the scans/, memories/ and answer pictures/ go
there, never into the directory the demo was started from.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

BRINGUP = ("m3_bringup", "scan_and_grasp.launch.py")
NODE_LOG = "m3_demo_nodes.log"


@dataclass
class DemoConfig:
    scene_size: str = "demo"          # demo scene generated (and cached) by m3_memory.sim: demo | tiny
    playback_rate: float = 1.0        # bag replay speed factor
    train_overrides: dict = field(default_factory=dict)  # merged over config/train.yaml for this run
    success_m: float = 0.05           # a target counts as a success within this distance of the object's centre
    startup_timeout_s: float = 90.0   # for the bringup's services to appear
    train_timeout_s: float = 7200.0
    locate_timeout_s: float = 120.0

    @classmethod
    def load(cls, path: Path, overrides: dict) -> "DemoConfig":
        """`path`'s settings with `overrides` (`--set`) merged in; ValueError naming an unknown or mistyped setting,
        `train_overrides` included, before anything runs (not after the scan, when the trainer would refuse them)."""
        from m3_memory.core.pipeline import load_train_config, merge

        data = merge(yaml.safe_load(path.read_text()) or {}, overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown demo settings {unknown} (in {path} or --set); known: {sorted(known)}")
        defaults = cls()
        for name, value in data.items():
            kind = type(getattr(defaults, name))
            if not (isinstance(value, kind) or kind is float and type(value) is int):
                raise ValueError(f"demo setting {name} must be {kind.__name__}, got {value!r}")
        config = cls(**data)
        load_train_config(None, config.train_overrides)   # ConfigError: "unknown training settings ...; known: ..."
        return config


def default_config_path() -> Path:
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("m3_bringup")) / "config" / "demo.yaml"


class Log:
    """Progress lines on stderr when `--json` keeps stdout for the result, on stdout otherwise."""

    def __init__(self, to_stderr: bool):
        self.stream = sys.stderr if to_stderr else sys.stdout

    def __call__(self, message: str) -> None:
        print(f"[m3 demo {time.strftime('%H:%M:%S')}] {message}", file=self.stream, flush=True)


class Operator:
    """The operator's side of the graph: service and action clients of one rclpy node in this process."""

    def __init__(self, log: Log):
        import rclpy
        from m3_msgs.action import Train
        from m3_msgs.msg import MemoryStatus, RecorderStatus
        from m3_msgs.srv import Locate
        from rclpy.action import ActionClient
        from std_srvs.srv import Trigger

        from m3_memory.ros.qos import LATCHED

        rclpy.init()
        self.rclpy, self.log = rclpy, log
        self.node = rclpy.create_node("m3_demo", start_parameter_services=False)
        self.start = self.node.create_client(Trigger, "m3/recorder/start")
        self.stop = self.node.create_client(Trigger, "m3/recorder/stop")
        self.locate = self.node.create_client(Locate, "m3/locate")
        self.train = ActionClient(self.node, Train, "m3/train")
        self.status: MemoryStatus | None = None
        self.recorder: RecorderStatus | None = None
        self.node.create_subscription(MemoryStatus, "m3/memory_status", self._on_status, LATCHED)
        self.node.create_subscription(RecorderStatus, "m3/recorder/status", self._on_recorder, 10)

    def _on_status(self, msg) -> None:
        self.status = msg

    def _on_recorder(self, msg) -> None:
        self.recorder = msg

    def scan_counts(self, scene_dir: str, timeout: float = 5.0) -> dict:
        """Frames seen, kept and rejected (by reason) of the scan into `scene_dir`, from the recorder's status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.rclpy.spin_once(self.node, timeout_sec=0.1)
            status = self.recorder
            if status is not None and status.scene_dir == scene_dir and not status.recording:
                return {"seen": status.frames_seen, "kept": status.frames_kept, "rejected": status.frames_rejected,
                        "reasons": dict(zip(status.reject_reasons, map(int, status.reject_counts)))}
        return {}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for client, name in ((self.start, "m3/recorder/start"), (self.stop, "m3/recorder/stop"),
                             (self.locate, "m3/locate")):
            if not client.wait_for_service(timeout_sec=max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{name} did not appear within {timeout:.0f} s: see the node log")
        if not self.train.wait_for_server(timeout_sec=max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"the m3/train action did not appear within {timeout:.0f} s: see the node log")

    def trigger(self, client, what: str, timeout: float = 30.0) -> str:
        from std_srvs.srv import Trigger

        from m3_memory.ros.graph_client import spin_until

        answer = spin_until(self.node, client.call_async(Trigger.Request()), timeout, what)
        if not answer.success:
            raise RuntimeError(f"{what} failed: {answer.message}")
        return answer.message

    def train_memory(self, scene_dir: str, overrides: dict, timeout: float):
        from m3_msgs.action import Train

        from m3_memory.ros.graph_client import send_goal, wait_result

        goal = Train.Goal(scene_dir=scene_dir, config_overrides=yaml.safe_dump(overrides) if overrides else "")
        last = [0.0]

        def on_feedback(message):
            f = message.feedback
            if time.monotonic() - last[0] > 10 or f.iteration == f.total_iterations:
                last[0] = time.monotonic()
                self.log(f"  training {f.iteration}/{f.total_iterations}: loss {f.loss:.4f}, "
                         f"{f.elapsed_seconds:.0f} s elapsed, ETA {f.eta_seconds:.0f} s")

        handle = send_goal(self.node, self.train, "m3/train", goal, on_feedback)
        if not handle.accepted:
            raise RuntimeError("the trainer rejected the goal: see the node log")
        _, result = wait_result(self.node, handle, timeout)
        if not result.success:
            raise RuntimeError(f"training failed: {result.message}")
        return result

    def wait_for_memory(self, checkpoint: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.rclpy.spin_once(self.node, timeout_sec=0.2)
            if self.status is not None and self.status.loaded and self.status.checkpoint == checkpoint:
                return
        raise RuntimeError(f"the memory server did not load {checkpoint} within {timeout:.0f} s")

    def ask(self, query: str, timeout: float):
        from m3_msgs.srv import Locate

        from m3_memory.ros.graph_client import spin_until

        return spin_until(self.node, self.locate.call_async(Locate.Request(query=query, return_heatmap=True)),
                          timeout, f"locate {query!r}")

    def close(self) -> None:
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def answer_picture(checkpoint: str, answer, directory: Path, query: str) -> str | None:
    """The served memory rendered from the view the answer's heatmap came from, the heatmap over it, as
    DIR/<query>.png; None when the answer has no heatmap."""
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.pictures import overlay, save_png
    from m3_memory.core.views import Camera
    from m3_memory.ros.conversions import camera_info_K, pose_to_matrix

    image = answer.heatmap
    if image.width == 0:
        return None
    memory, _ = load_memory(checkpoint)
    camera = Camera(pose_to_matrix(answer.heatmap_view.pose), camera_info_K(answer.heatmap_camera), image.width,
                    image.height)
    heatmap = np.frombuffer(bytes(image.data), dtype=np.float32).reshape(image.height, image.width)
    stem = "".join(c if c.isalnum() else "_" for c in query).strip("_") or "answer"
    return str(save_png(directory / f"{stem}.png", overlay(memory.render(camera).rgb, heatmap)))


def ground_truth(scene_dir: Path) -> list[dict]:
    """Each object's first phrase and centre `[3]` (world frame) from the demo scene's objects.json."""
    objects = json.loads((scene_dir / "objects.json").read_text())["objects"]
    return [{"query": o["phrases"][0], "truth": np.asarray(o["center"], dtype=float)} for o in objects]


def default_workdir() -> Path:
    from m3_memory.core.resources import cache_dir

    return cache_dir() / "demo_run"


def start_bringup(workdir: Path, log_path: Path) -> subprocess.Popen:
    ros2 = Path(sys.prefix) / "bin" / "ros2"
    command = [str(ros2) if ros2.exists() else "ros2", "launch", *BRINGUP]
    return subprocess.Popen(command, cwd=workdir, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_demo(config: DemoConfig, workdir: Path, log: Log) -> dict:
    from m3_memory.sim import demo_scene

    log(f"demo scene ({config.scene_size})")
    scene_dir = demo_scene(config.scene_size, progress=log)
    workdir.mkdir(parents=True, exist_ok=True)
    node_log = workdir / NODE_LOG
    log(f"starting {' '.join(BRINGUP)} (node output: {node_log})")
    bringup = start_bringup(workdir, node_log)
    operator = Operator(log)
    try:
        operator.wait_ready(config.startup_timeout_s)
        scan = operator.trigger(operator.start, "m3/recorder/start")
        log(f"scan started: {scan}")
        started = time.monotonic()
        m3 = Path(sys.prefix) / "bin" / "m3"
        subprocess.run([str(m3), "play", str(scene_dir / "bag"), "--rate", str(config.playback_rate),
                        "--wait-for", "/camera/color/image_raw"], check=True, stdout=subprocess.DEVNULL)
        log(f"bag replayed in {time.monotonic() - started:.1f} s")
        log(f"scan stopped: {operator.trigger(operator.stop, 'm3/recorder/stop')}")
        frames = operator.scan_counts(scan)
        log(f"training on {scan} (overrides {config.train_overrides or 'none'})")
        started = time.monotonic()
        result = operator.train_memory(scan, config.train_overrides, config.train_timeout_s)
        train_s = time.monotonic() - started
        log(f"trained in {train_s:.0f} s: {result.num_gaussians} Gaussians, PSNR {result.psnr:.1f} dB → "
            f"{result.checkpoint}")
        operator.wait_for_memory(result.checkpoint, 120)
        rows, latencies = [], []
        for obj in ground_truth(scene_dir):
            started = time.monotonic()
            answer = operator.ask(obj["query"], config.locate_timeout_s)
            latencies.append(1e3 * (time.monotonic() - started))
            if not answer.success:
                log(f"  {obj['query']!r}: {answer.message}")
                rows.append({"query": obj["query"], "target": None, "truth": obj["truth"].round(4).tolist(),
                             "error_m": None, "success": False, "picture": None})
                continue
            p = answer.target.point
            target = np.array([p.x, p.y, p.z])
            error = float(np.linalg.norm(target - obj["truth"]))
            rows.append({"query": obj["query"], "target": target.round(4).tolist(),
                         "truth": obj["truth"].round(4).tolist(), "error_m": round(error, 4),
                         "success": error <= config.success_m,
                         "picture": answer_picture(result.checkpoint, answer, workdir / "pictures", obj["query"])})
            log(f"  {obj['query']!r}: target {np.round(target, 3).tolist()} ({answer.target.header.frame_id}), error "
                f"{100 * error:.1f} cm, {latencies[-1]:.0f} ms")
    finally:
        operator.close()
        stop(bringup)
    return {"objects": rows, "train_s": round(train_s, 1), "locate_ms_mean": round(float(np.mean(latencies)), 1),
            "locate_ms_p95": round(float(np.percentile(latencies, 95)), 1), "frames": frames, "scene_dir": scan}


def table(report: dict, success_m: float) -> str:
    lines = [f"{'query':<20} {'target (world, m)':<26} {'truth (world, m)':<26} {'error':>8}  ok"]
    for row in report["objects"]:
        target = "not found" if row["target"] is None else str([round(x, 3) for x in row["target"]])
        error = "-" if row["error_m"] is None else f"{100 * row['error_m']:.1f} cm"
        lines.append(f"{row['query']:<20} {target:<26} {str([round(x, 3) for x in row['truth']]):<26} {error:>8}  "
                     f"{'yes' if row['success'] else 'no'}")
    hits = sum(row["success"] for row in report["objects"])
    lines.append(f"{hits}/{len(report['objects'])} within {100 * success_m:.0f} cm; training {report['train_s']:.0f} s;"
                 f" locate {report['locate_ms_mean']:.0f} ms mean, {report['locate_ms_p95']:.0f} ms p95")
    return "\n".join(lines)


def run(args) -> int:
    from m3_memory.cli.common import FAILED
    from m3_memory.core.pipeline import parse_overrides

    config = DemoConfig.load(args.config or default_config_path(), parse_overrides(args.set))
    workdir = (args.workdir or default_workdir()).expanduser().resolve()
    try:
        report = run_demo(config, workdir, Log(to_stderr=args.json))
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"m3 demo: failed: {exc} (node output: {workdir / NODE_LOG})", file=sys.stderr)
        return FAILED
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report, config.success_m))
    return 0


def register(verbs) -> None:
    from m3_memory.cli.common import add_settings

    parser = verbs.add_parser("demo", help="scan → train → locate on the demo bag through the ROS 2 nodes")
    parser.add_argument("--json", action="store_true", help="last line of output: the result as one JSON object")
    parser.add_argument("--config", type=Path, default=None, help="demo settings (default m3_bringup/config/demo.yaml)")
    add_settings(parser, "override demo settings, e.g. scene_size=tiny train_overrides.iterations=300")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the nodes run: their log, scans/, memories/, pictures/ (default: "
                             "$M3_CACHE_DIR/demo_run, or ~/.cache/m3_memory/demo_run)")
    parser.set_defaults(func=run)
