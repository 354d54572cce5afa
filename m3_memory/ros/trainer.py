"""Training worker node: the `/m3/train` action server (m3_msgs/action/Train).

A goal names a scan by robot and scan id (as the recorder reports it: its status's `scene_dir` or the stop answer;
the last path component is taken) or a scene directory on this machine, plus YAML overrides of config/train.yaml.
Goals are queued FIFO, never refused for being busy: a queued goal's feedback says `stage: queued` and how many
jobs are ahead of it (`queue_position`), cancelling it removes it from the queue. The queue is saved in
`<storage_root>/queue.json` (m3_memory.core.jobs) after every change, so a restarted worker runs the jobs it had,
the interrupted one first, by itself (no client follows them; results go to the log and the announcements).

A scan goal is fetched from `/<robot>/m3/recorder` (or `m3/recorder` in this node's namespace for robot "") into
`<storage_root>/<robot>/scans/<scan_id>` with m3_memory.ros.transfer (chunks verified by sha256, resumed after
either side restarts, progress as `stage: fetching` feedback with bytes); a goal sent while the scan is still
recording fetches keyframes as they are written and trains as soon as the scan ends. A scan held already (pulled
completely before) is not asked for again: the recorder may be gone by then. Its memory goes to
`<storage_root>/<robot>/memories/<output or scan_id>.pt`, is announced on `m3/trainer/memory_ready` (JSON: robot, id,
sha256) and served to memory servers under `m3/trainer/manifest|chunk`. After each job, `keep_scans` and
`keep_memories` (0 = all) prune that robot's oldest. A scene directory goal works as before: the path must resolve
under one of `scene_roots`, `output` is relative to `output_root`; its path is announced on `m3/checkpoint`
(latched) for a memory server on this disk, as is every memory written.

The node extracts the features (cached in the scene), trains with m3_memory.core.trainer on the `device` parameter's
device (auto = CUDA when present; a goal's `device` override wins), sends feedback every `log_every` iterations,
honours cancel and writes the checkpoint atomically. An existing file there is replaced only when it is a memory.

Refusals: a goal that cannot run (no scene, a path outside the roots, invalid YAML, an unknown or mistyped setting, an
iteration count below 1, a device this machine lacks, a scan its recorder does not have) ends ABORTED with
`result.success = false` and `result.message` saying why. That is the ROS 2 convention for reasons (an action's goal
response carries no text), so a client reads the reason from the result, not from this node's log. Nothing is
written or announced for an aborted goal.
"""
from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml
from m3_msgs.action import Train
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String

from m3_memory.core.atomic import remove_stale_temps
from m3_memory.core.checkpoint import memory_format
from m3_memory.core.errors import M3Error
from m3_memory.core.jobs import QUEUE_FILE, Job, JobQueue
from m3_memory.core.paths import confine
from m3_memory.core.pipeline import DEFAULT_TRAIN_CONFIG, load_train_config, scene_features
from m3_memory.core.scene import Scene
from m3_memory.core.storage import (DEFAULT_CHUNK_BYTES, PullProgress, Storage, file_sha256, held_manifest,
                                    robot_name)
from m3_memory.core.trainer import TrainConfig, TrainingCancelled, train
from m3_memory.ros.qos import LATCHED
from m3_memory.ros.spin import spin_node
from m3_memory.ros.transfer import SOURCE_TIMEOUT_S, TransferClient, TransferServer

QUEUED_FEEDBACK_S = 1.0   # how often queued goals are told their place again (a late-subscribing client learns it)


class JobError(M3Error):
    """Why a job ended before training: its message says at which step."""


@dataclass
class TrainJob:
    """A goal checked and resolved: where to read, where to write, with which settings; `robot`/`scan_id` set when
    the scene is a scan to fetch."""
    scene_dir: Path
    output: Path
    config: TrainConfig
    robot: str = ""
    scan_id: str = ""


def scan_name(scan_id: str) -> str:
    """The id in `scan_id`, which may be the recorder's whole `scene_dir` path."""
    return scan_id.rstrip("/").rsplit("/", 1)[-1]


def plan_goal(goal: Train.Goal, scene_roots: list[Path], output_root: Path, config_path: Path,
              storage: Storage | None = None, device: str = "auto") -> TrainJob:
    """The job a Train goal asks for, or M3Error / ValueError saying why it cannot run. Reads files only; a scan
    goal's scene is checked once it is fetched. `device` (not auto) is the default a goal's overrides may change."""
    scan_id = scan_name(goal.scan_id)
    if scan_id:
        if storage is None:
            raise M3Error("this trainer has no storage_root: it cannot fetch scans")
        scene_dir = storage.scan_dir(goal.robot, scan_id)
        output_root = storage.memories_dir(goal.robot)
    else:
        if not goal.scene_dir:
            raise M3Error("scene_dir is empty and so is scan_id: give the scan id the recorder reported (with its "
                          "robot), or a scene directory on this machine")
        scene_dir = confine(goal.scene_dir, scene_roots, "scene_dir")
        if not (scene_dir / "scene.json").is_file():
            raise M3Error(f"{goal.scene_dir} is not a scene directory readable on this machine (no scene.json); a "
                          "scan on another machine is named by scan_id and robot")
    overrides = {}
    if goal.config_overrides:
        try:
            overrides = yaml.safe_load(goal.config_overrides)
        except yaml.YAMLError as exc:
            raise M3Error(f"config_overrides is not valid YAML: {exc}") from exc
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise M3Error("config_overrides must be a YAML mapping, e.g. 'iterations: 500'")
    if device != "auto":
        overrides = {"device": device, **overrides}
    config = load_train_config(config_path, overrides)   # type-checked, iterations >= 1, the device exists
    output = confine(output_root / (goal.output or f"{scene_dir.name}.pt"), [output_root], "output")
    if output == output_root or output.is_dir():
        raise M3Error(f"output {goal.output or output} is a folder: name the memory file to write")
    if output.exists() and memory_format(output) is None:
        raise M3Error(f"output {output} exists and is not a memory: it is never overwritten; choose another name")
    return TrainJob(scene_dir, output, config, goal.robot if scan_id else "", scan_id)


class Reporter:
    """Feedback and cancel of one job: its goal handle, or nothing for a job restored from the saved queue."""

    def __init__(self, handle=None):
        self.handle = handle
        self.fields: dict = {}

    def feedback(self, **fields) -> None:
        self.fields.update(fields)
        if self.handle is not None:
            self.handle.publish_feedback(Train.Feedback(**self.fields))

    @property
    def cancelled(self) -> bool:
        return self.handle is not None and self.handle.is_cancel_requested


class Trainer(Node):
    def __init__(self):
        super().__init__("trainer")
        p = self.declare_parameter
        self.config_path = Path(p("train_config", str(DEFAULT_TRAIN_CONFIG)).value)
        self.models = list(p("models", ["m3-tinyvlm"]).value)
        self.scene_roots = [Path(r).expanduser().resolve() for r in p("scene_roots", ["scans"]).value]
        self.output_root = Path(p("output_root", "memories").value).expanduser().resolve()
        self.storage = Storage(p("storage_root", "storage").value)
        self.device = p("device", "auto").value
        self.keep_scans, self.keep_memories = p("keep_scans", 0).value, p("keep_memories", 0).value
        self.chunk_bytes = p("transfer_chunk_bytes", DEFAULT_CHUNK_BYTES).value
        self.source_timeout_s = p("source_timeout_seconds", SOURCE_TIMEOUT_S).value
        for root in (self.output_root, self.storage.root):   # a save or a pull killed mid-write
            for path in remove_stale_temps(root, recursive=True):
                self.get_logger().info(f"removed {path}, left by an interrupted write")
        self.checkpoint_pub = self.create_publisher(String, "m3/checkpoint", LATCHED)
        self.ready_pub = self.create_publisher(String, "m3/trainer/memory_ready", LATCHED)
        self.transfer = TransferServer(self, "m3/trainer", scans=self.storage.scans_dir,
                                       memories=self.storage.memories_dir,
                                       complete=lambda scan: held_manifest(scan) is not None)
        self.sources: dict[str, TransferClient] = {}
        self.queue = JobQueue(self.storage.root / QUEUE_FILE)
        self.handles: dict[str, object] = {}         # job id → goal handle (absent: restored from the saved queue)
        self.cancelled_queued: set[str] = set()
        self._start_lock = threading.Lock()
        restored = self.queue.load()
        self.server = ActionServer(self, Train, "m3/train", execute_callback=self.execute,
                                   goal_callback=lambda _: GoalResponse.ACCEPT,
                                   handle_accepted_callback=self.on_accepted,
                                   cancel_callback=self.on_cancel, callback_group=ReentrantCallbackGroup())
        self.create_timer(QUEUED_FEEDBACK_S, self.publish_positions, callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(f"serving the /m3/train action (models {self.models}, config {self.config_path}, "
                               f"device {self.device}); scans fetched to {self.storage.root}, scene directories "
                               f"under {[str(r) for r in self.scene_roots]}, their memories to {self.output_root}")
        if restored:
            self.get_logger().info(f"{len(restored)} job(s) restored from {self.queue.path}: running them in order")
            self.start_next()

    # --- the queue ----------------------------------------------------------------------------------------------
    def on_accepted(self, goal_handle) -> None:
        g = goal_handle.request
        job = Job(job_id=bytes(goal_handle.goal_id.uuid).hex(), robot=g.robot, scan_id=g.scan_id,
                  scene_dir=g.scene_dir, output=g.output, config_overrides=g.config_overrides)
        self.handles[job.job_id] = goal_handle
        position = self.queue.add(job)
        goal_handle.publish_feedback(Train.Feedback(queue_position=position, stage="queued"))
        self.start_next()

    def start_next(self) -> None:
        """Start the first job if none runs: its goal's execute callback, or a thread for a restored job."""
        with self._start_lock:
            job = self.queue.start_next()
            if job is None:
                return
            handle = self.handles.get(job.job_id)
            if handle is None:
                threading.Thread(target=self.run_job, args=(job, Reporter()), name="restored-job",
                                 daemon=True).start()
            else:
                handle.execute()
        self.publish_positions()

    def publish_positions(self) -> None:
        for position, job in enumerate(self.queue.jobs()):
            handle = self.handles.get(job.job_id)
            if job.state == "queued" and handle is not None and handle.is_active:
                handle.publish_feedback(Train.Feedback(queue_position=position, stage="queued"))

    def on_cancel(self, goal_handle) -> CancelResponse:
        job_id = bytes(goal_handle.goal_id.uuid).hex()
        if self.queue.remove_queued(job_id):
            self.cancelled_queued.add(job_id)
            goal_handle.execute()   # its execute callback ends it as cancelled: a goal ends only there
            self.publish_positions()
        return CancelResponse.ACCEPT

    def execute(self, goal_handle) -> Train.Result:
        job_id = bytes(goal_handle.goal_id.uuid).hex()
        if job_id in self.cancelled_queued:
            self.cancelled_queued.discard(job_id)
            self.handles.pop(job_id, None)
            deadline = time.monotonic() + 5.0   # the cancel's state change follows its callback
            while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.01)
            goal_handle.canceled()
            return Train.Result(success=False, message="cancelled while queued; it never ran")
        job = next(j for j in self.queue.jobs() if j.job_id == job_id)
        return self.run_job(job, Reporter(goal_handle))

    def run_job(self, job: Job, reporter: Reporter) -> Train.Result:
        """Run one job to its end; the goal (if any) ends here. Then the next job starts."""
        handle = reporter.handle
        try:
            result = self._run(job, reporter)
            if handle is not None:
                handle.succeed()
            return result
        except TrainingCancelled as exc:
            self.get_logger().info(str(exc))
            if handle is not None:
                handle.canceled()
            return Train.Result(success=False, message=f"{exc}; the previous memory stays in service")
        except JobError as exc:
            return self._abort(handle, str(exc))
        except (M3Error, ValueError, OSError) as exc:
            return self._abort(handle, f"training failed: {exc}")
        except Exception as exc:  # a bug: the client still learns what happened, the log gets the traceback
            self.get_logger().error(traceback.format_exc())
            return self._abort(handle, f"training failed: {type(exc).__name__}: {exc}")
        finally:
            self.queue.remove(job.job_id)
            self.handles.pop(job.job_id, None)
            self.start_next()

    def _abort(self, handle, message: str) -> Train.Result:
        if handle is not None:
            handle.abort()
        self.get_logger().warning(message)
        return Train.Result(success=False, message=message)

    # --- one job ------------------------------------------------------------------------------------------------
    def _run(self, job: Job, reporter: Reporter) -> Train.Result:
        goal = Train.Goal(scene_dir=job.scene_dir, output=job.output, config_overrides=job.config_overrides,
                          robot=job.robot, scan_id=job.scan_id)
        try:
            plan = plan_goal(goal, self.scene_roots, self.output_root, self.config_path, self.storage, self.device)
        except (M3Error, ValueError, OSError) as exc:
            raise JobError(f"goal refused: {exc}") from exc
        fetched = ""
        if plan.scan_id:
            try:
                fetched = self.fetch(plan, reporter)
            except (M3Error, OSError) as exc:
                if reporter.cancelled:
                    raise TrainingCancelled("cancelled while fetching the scan") from exc
                raise JobError(f"fetching the scan failed: {exc}") from exc
            if not (plan.scene_dir / "scene.json").is_file():
                raise JobError(f"scan {plan.scan_id} of {plan.robot or 'this namespace'} holds no frame "
                               "(no scene.json)")
        result = self._train(plan, reporter)
        result.message = "; ".join(m for m in (fetched, result.message) if m)
        if plan.scan_id:
            protect = [self.storage.scan_dir(j.robot, scan_name(j.scan_id)) for j in self.queue.jobs() if j.scan_id]
            for path in self.storage.retain(plan.robot, self.keep_scans, self.keep_memories, [plan.output, *protect]):
                self.get_logger().info(f"retention: removed {path}")
        return result

    def source(self, robot: str) -> TransferClient:
        prefix = f"/{robot.strip('/')}/m3/recorder" if robot.strip("/") else "m3/recorder"
        if prefix not in self.sources:
            self.sources[prefix] = TransferClient(self, prefix, self.chunk_bytes, self.source_timeout_s)
        return self.sources[prefix]

    def fetch(self, plan: TrainJob, reporter: Reporter) -> str:
        """Pull the job's scan unless held; returns what happened, for the result message."""
        if held_manifest(plan.scene_dir) is not None:
            return f"scan {plan.scan_id} already held here"
        started, last = time.monotonic(), [0.0]

        def progress(stats: PullProgress) -> None:
            if stats.complete or time.monotonic() - last[0] > 0.25:   # feedback at most 4 Hz
                last[0] = time.monotonic()
                reporter.feedback(queue_position=0, stage="fetching", bytes_done=stats.bytes_done,
                                  bytes_total=stats.bytes_total)

        self.get_logger().info(f"fetching scan {plan.scan_id} from {self.source(plan.robot).prefix} to "
                               f"{plan.scene_dir}")
        stats = self.source(plan.robot).pull("scan", plan.robot, plan.scan_id, plan.scene_dir, progress,
                                             lambda: reporter.cancelled)
        seconds = time.monotonic() - started
        text = (f"fetched scan {plan.scan_id}: {stats.bytes_total / 1e6:.1f} MB in {stats.files} files "
                f"({stats.bytes_held / 1e6:.1f} MB held already) in {seconds:.1f} s, every file's sha256 verified"
                + (f", {stats.chunks_resent} corrupted chunk(s) re-sent" if stats.chunks_resent else ""))
        self.get_logger().info(text)
        return text

    def _train(self, job: TrainJob, reporter: Reporter) -> Train.Result:
        scene = Scene.load(job.scene_dir)
        self.get_logger().info(f"training {len(scene)} views of {job.scene_dir} for {job.config.iterations} "
                               f"iterations → {job.output}")
        started = time.monotonic()
        reporter.feedback(queue_position=0, stage="features", total_iterations=job.config.iterations)
        features = scene_features(scene, job.scene_dir, self.models, device=job.config.device)
        reporter.feedback(stage="training")

        def feedback(progress):
            reporter.feedback(iteration=progress.iteration, total_iterations=progress.total, loss=progress.loss,
                              rgb_loss=progress.rgb_loss, feature_loss=progress.feature_loss,
                              elapsed_seconds=progress.elapsed_s, eta_seconds=progress.eta_s)

        memory = train(scene, features, job.config, job.output, callback=feedback,
                       should_cancel=lambda: reporter.cancelled)
        final = memory.config["final"]
        self.checkpoint_pub.publish(String(data=str(job.output)))
        if job.scan_id:
            self.ready_pub.publish(String(data=json.dumps({"robot": robot_name(job.robot),
                                                           "id": job.output.stem,
                                                           "sha256": file_sha256(job.output)})))
        self.get_logger().info(f"memory written to {job.output} ({len(memory.gaussians)} Gaussians)")
        return Train.Result(success=True, message="trained", checkpoint=str(job.output),
                            iterations=job.config.iterations, final_loss=final["loss"], psnr=final["psnr"],
                            num_gaussians=len(memory.gaussians), train_seconds=time.monotonic() - started)


def main(args: list[str] | None = None) -> int:
    return spin_node(Trainer, args, threads=6)
