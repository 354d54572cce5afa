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

Live mode (issue #15): a goal with `live` trains while its scan still records. The scan is read as it grows (a
local scan directory in place, a scan of another computer through the pull, which runs in a thread beside the
training); only complete frames are read (the recorder, and a pull, write a frame's images before its index line).
Once `live_min_views` keyframes are there it trains a first memory (`live_first_iterations`), then updates it
(m3_memory.core.online.update, `live_update_iterations` each) with the keyframes that arrived since, their features
extracted alone (the feature cache is per frame), and at most every `publish_every_s` writes the newest memory to the
output atomically and announces it as a finished job does (`m3/checkpoint`, and `m3/trainer/memory_ready` for scans),
so memory servers swap it in. When the scan ends (the pull completed; for a local scan the recorder's status no
longer names it as recording, or no status came within SOURCE_TIMEOUT_S) the keyframes that arrived by then are
taken in by an ordinary step and published at once; then that last step is redone from the memory before it with
`live_final_iterations` (the final refinement), the memory is published and the goal succeeds. With the node
parameter `live` (launch `live:=true`) the trainer follows its own namespace's recorder: each scan that starts
recording gets a live job queued by the trainer itself (no goal: progress in the log and the announcements), read in
place when it lies under `scene_roots` (same computer), else fetched by id. A live goal for such a scan (`m3
train-remote --live`), while its job is queued or runs, attaches to that job instead of training the scan a second
time: the goal gets the job's feedback, its cancel stops the job, and it ends with the job's result (a goal with an
output, settings or base memory of its own is a job of its own). A scan is queued a live job once, by whichever
comes first. Feedback reports the job's latest memory (views, Gaussians, bank sizes) and the age of the one last
published.

A goal with `base_memory` updates that memory (a memory id of the goal's robot in `storage_root`, or a path under
`output_root`) with the goal's scene instead of training from scratch, replaying the scans it was built from that are
still on this disk, and writes a new memory to `output`; with `live` as well, the live job starts from it. The
settings of an update are the `update:` mapping of `config_overrides` (m3_memory.core.online.UpdateConfig), the
training settings those the base memory was trained with, the goal's other overrides over them.

Refusals: a goal that cannot run (no scene, a path outside the roots, invalid YAML, an unknown or mistyped setting, an
iteration count below 1, a device this machine lacks, a scan its recorder does not have) ends ABORTED with
`result.success = false` and `result.message` saying why. That is the ROS 2 convention for reasons (an action's goal
response carries no text), so a client reads the reason from the result, not from this node's log. Nothing is
written or announced for an aborted goal.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from action_msgs.msg import GoalStatus
from m3_msgs.action import Train
from m3_msgs.msg import RecorderStatus
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String

from m3_memory.core.atomic import remove_stale_temps, write_atomic
from m3_memory.core.checkpoint import CHECKPOINT_FORMAT, Memory, load_memory, memory_format
from m3_memory.core.errors import M3Error
from m3_memory.core.jobs import QUEUE_FILE, Job, JobQueue
from m3_memory.core.online import SceneViews, UpdateConfig, recorded_views, train_config_of, update
from m3_memory.core.paths import confine
from m3_memory.core.pipeline import DEFAULT_TRAIN_CONFIG, Extractors, load_train_config
from m3_memory.core.scene import INDEX_FILE, META_FILE, Scene
from m3_memory.core.storage import (DEFAULT_CHUNK_BYTES, MEMORY_SUFFIX, PullProgress, Storage, file_sha256,
                                    held_manifest, robot_name)
from m3_memory.core.trainer import TrainConfig, TrainingCancelled, resolve_device, train, training_views
from m3_memory.ros.qos import LATCHED
from m3_memory.ros.spin import spin_node
from m3_memory.ros.transfer import SOURCE_TIMEOUT_S, TransferClient, TransferServer, own_robot

QUEUED_FEEDBACK_S = 1.0   # how often queued goals are told their place again (a late-subscribing client learns it)
LIVE_POLL_S = 0.5         # how often a live job looks for new keyframes
PULL_STOP_S = 15.0        # how long a live job's stopped pull may take to notice (it checks between service answers)


class JobError(M3Error):
    """Why a job ended before training: its message says at which step."""


@dataclass
class LiveSettings:
    """The trainer node's live-mode parameters (m3_bringup/config/trainer.yaml)."""
    min_views: int = 4               # keyframes on this disk before the first memory is trained
    first_iterations: int = 200      # the first memory's training
    update_iterations: int = 100     # each update with the keyframes that arrived since the last step
    final_iterations: int = 400      # the update that ends a live job, once the scan has ended
    publish_every_s: float = 10.0    # at most this often the newest memory is written to the output and announced

    def validate(self) -> None:
        for name in ("min_views", "first_iterations", "update_iterations", "final_iterations"):
            if getattr(self, name) < 1:
                raise M3Error(f"trainer parameter live_{name} must be at least 1, got {getattr(self, name)}")
        if self.publish_every_s < 0:
            raise M3Error(f"trainer parameter publish_every_s must be ≥ 0, got {self.publish_every_s}")


@dataclass
class TrainJob:
    """A goal checked and resolved: where to read, where to write, with which settings; `robot`/`scan_id` set when
    the scene is a scan to fetch (`robot` also names the recorder a live job follows); `overrides` are the goal's
    training settings (a base memory's own settings lie under them), `update` its update settings."""
    scene_dir: Path
    output: Path
    config: TrainConfig
    robot: str = ""
    scan_id: str = ""
    live: bool = False
    base_memory: Path | None = None
    overrides: dict = field(default_factory=dict)
    update: UpdateConfig = field(default_factory=UpdateConfig)


def scan_name(scan_id: str) -> str:
    """The id in `scan_id`, which may be the recorder's whole `scene_dir` path."""
    return scan_id.rstrip("/").rsplit("/", 1)[-1]


def base_memory_path(text: str, robot: str, storage: Storage | None, output_root: Path) -> Path:
    """A goal's `base_memory`: a memory id (no `/`, no `.pt`) of `robot` in `storage`, else a path under
    `output_root` (relative to it); M3Error unless a safetensors m3 memory is there."""
    if "/" not in text and not text.endswith(MEMORY_SUFFIX):
        if storage is None:
            raise M3Error(f"base_memory {text!r} names a memory id, but this trainer has no storage_root")
        path = storage.memory_path(robot, text)
    else:
        path = confine(output_root / text, [output_root], "base_memory")
    found = memory_format(path)
    if found != CHECKPOINT_FORMAT:
        raise M3Error(f"base_memory {text!r}: {path} is " + ("not there" if not path.exists() else
                      f"not a {CHECKPOINT_FORMAT} memory ({found or 'another file'})"))
    return path


def plan_goal(goal: Train.Goal, scene_roots: list[Path], output_root: Path, config_path: Path,
              storage: Storage | None = None, device: str = "auto") -> TrainJob:
    """The job a Train goal asks for, or M3Error / ValueError saying why it cannot run. Reads files only; a scan
    goal's scene is checked once it is fetched (a live goal's as it records). `device` (not auto) is the default a
    goal's overrides may change."""
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
        if not goal.live and not (scene_dir / META_FILE).is_file():   # a live scan may have no frame yet
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
    update_settings = overrides.pop("update", None)
    if update_settings is not None and not (goal.live or goal.base_memory):
        raise M3Error("config_overrides' update: settings apply to live and base_memory goals only")
    update_config = UpdateConfig.from_dict(update_settings or {})
    if device != "auto":
        overrides = {"device": device, **overrides}
    config = load_train_config(config_path, overrides)   # type-checked, iterations >= 1, the device exists
    base = base_memory_path(goal.base_memory, goal.robot, storage, output_root) if goal.base_memory else None
    output = confine(output_root / (goal.output or f"{scene_dir.name}.pt"), [output_root], "output")
    if output == output_root or output.is_dir():
        raise M3Error(f"output {goal.output or output} is a folder: name the memory file to write")
    if output.exists() and memory_format(output) is None:
        raise M3Error(f"output {output} exists and is not a memory: it is never overwritten; choose another name")
    if base is not None and base == output:
        raise M3Error(f"output {output} is the base memory: an update writes a new memory, name another output")
    return TrainJob(scene_dir, output, config, goal.robot if scan_id or goal.live else "", scan_id, goal.live, base,
                    overrides, update_config)


class Reporter:
    """Feedback, cancel and end of the job `job_id`. `handle`: the goal that asked for it, whose execute callback runs
    it; a job restored from the saved queue or queued by the trainer itself has none and runs in a thread of its own,
    until a live goal attaches to it (`attach`). Feedback comes from the job's thread and its pull's; the age of the
    memory published last is computed when each feedback is sent. The job's end (`end`: its status and result) is
    what its goal's execute callback waits for and reports."""

    def __init__(self, job_id: str, handle=None):
        self.job_id, self.handle = job_id, handle
        self.runs_in_goal = handle is not None
        self.fields: dict = {"memory_age_seconds": -1.0}
        self.published_at: float | None = None
        self.status = GoalStatus.STATUS_UNKNOWN   # STATUS_SUCCEEDED, _CANCELED or _ABORTED once ended
        self.result: Train.Result | None = None
        self.ended = threading.Event()
        self._lock = threading.Lock()

    def attach(self, handle) -> bool:
        """Give this goal-less job the goal `handle` (its feedback, cancel and result); False when it has a goal or has
        ended already. The feedback so far is sent at once."""
        with self._lock:
            if self.handle is not None or self.ended.is_set():
                return False
            self.handle = handle
        self.feedback()
        return True

    def end(self, status: int, result: Train.Result) -> None:
        with self._lock:
            self.status, self.result = status, result
            self.ended.set()

    def feedback(self, **fields) -> None:
        with self._lock:
            self.fields.update(fields)
            if self.published_at is not None:
                self.fields["memory_age_seconds"] = time.monotonic() - self.published_at
            if self.handle is not None:
                self.handle.publish_feedback(Train.Feedback(**self.fields))

    def memory(self, memory: Memory, published: bool = False) -> None:
        """Report `memory` as the job's latest; `published`: it has just been announced."""
        if published:
            self.published_at = time.monotonic()
        banks = memory.bank_sizes()
        self.feedback(views_in_memory=len(memory.views.c2w), num_gaussians=len(memory.gaussians),
                      bank_models=list(banks), bank_sizes=list(banks.values()),
                      memories_published=self.fields.get("memories_published", 0) + int(published))

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
        self.follow_live = p("live", False).value
        defaults = LiveSettings()
        self.live = LiveSettings(**{name: p(f"live_{name}", getattr(defaults, name)).value for name in
                                    ("min_views", "first_iterations", "update_iterations", "final_iterations")},
                                 publish_every_s=float(p("publish_every_s", defaults.publish_every_s).value))
        self.live.validate()
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
        self.goals: dict[str, Reporter] = {}       # goal id → the reporter of the job it follows, while it is active
        self._start_lock = threading.Lock()
        self.recorder_statuses: dict[str, RecorderStatus] = {}   # status topic → its latest message
        self.watched: set[str] = set()
        restored = self.queue.load()
        # job id → its reporter, while the job is queued or runs
        self.reporters: dict[str, Reporter] = {job.job_id: Reporter(job.job_id) for job in restored}
        self.followed = {self.scan_of(job) for job in restored if job.live}   # the scans live jobs were queued for
        # the own namespace's recorder: live jobs of local scans end by it, and `live` follows its scans
        self.watch_recorder("")
        self.server = ActionServer(self, Train, "m3/train", execute_callback=self.execute,
                                   goal_callback=lambda _: GoalResponse.ACCEPT,
                                   handle_accepted_callback=self.on_accepted,
                                   cancel_callback=self.on_cancel, callback_group=ReentrantCallbackGroup())
        self.create_timer(QUEUED_FEEDBACK_S, self.publish_positions, callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(f"serving the /m3/train action (models {self.models}, config {self.config_path}, "
                               f"device {self.device}); scans fetched to {self.storage.root}, scene directories "
                               f"under {[str(r) for r in self.scene_roots]}, their memories to {self.output_root}"
                               + ("; live: every scan the recorder starts is trained while it records"
                                  if self.follow_live else ""))
        if restored:
            self.get_logger().info(f"{len(restored)} job(s) restored from {self.queue.path}: running them in order")
            self.start_next()

    # --- the recorders ------------------------------------------------------------------------------------------
    def watch_recorder(self, robot: str) -> str:
        """Subscribe to the status of `robot`'s recorder ("" = this namespace's) once; returns its topic."""
        topic = f"/{robot.strip('/')}/m3/recorder/status" if robot.strip("/") else "m3/recorder/status"
        with self._start_lock:
            if topic in self.watched:
                return topic
            self.watched.add(topic)
            self.create_subscription(RecorderStatus, topic, lambda msg: self.on_recorder_status(topic, msg), LATCHED,
                                     callback_group=MutuallyExclusiveCallbackGroup())
        return topic

    def on_recorder_status(self, topic: str, msg: RecorderStatus) -> None:
        self.recorder_statuses[topic] = msg
        if not (self.follow_live and topic == "m3/recorder/status" and msg.recording and msg.scene_dir):
            return
        try:   # on this computer (or a shared disk): read in place; else fetched by id, beside the training
            scene_dir, scan_id = str(confine(msg.scene_dir, self.scene_roots, "scan")), ""
        except M3Error:
            scene_dir, scan_id = "", scan_name(msg.scene_dir)
        robot = "" if self.get_namespace() == "/" else own_robot(self)
        job = Job(job_id=uuid.uuid4().hex, robot=robot if scan_id else "", scan_id=scan_id, scene_dir=scene_dir,
                  live=True)
        with self._start_lock:   # a live goal for this scan may have come first
            if self.scan_of(job) in self.followed:
                return
            self.followed.add(self.scan_of(job))
            self.reporters[job.job_id] = Reporter(job.job_id)
            position = self.queue.add(job)
        self.get_logger().info(f"live: the recorder started {msg.scene_dir}; queued a live job for it "
                               f"({position} ahead)")
        self.start_next()

    def scan_of(self, job: Job) -> tuple[str, str]:
        """The recorder (its namespace) and the scan id a job names, whether by scan id or scene directory."""
        robot = job.robot.strip("/")
        return ("/" + robot if robot else self.get_namespace(), scan_name(job.scan_id or job.scene_dir))

    def goalless_live_job(self, job: Job) -> Reporter | None:
        """The reporter of the goal-less live job (queued by the trainer itself, or restored) of the scan the live goal
        `job` names, for the goal to attach to; None when there is none, or when the goal asks for an output, settings
        or a base memory of its own (it is a job of its own then). Called under `_start_lock`."""
        if job.output or job.config_overrides or job.base_memory:
            return None
        for queued in self.queue.jobs():
            reporter = self.reporters.get(queued.job_id)
            if queued.live and reporter is not None and reporter.handle is None and \
                    self.scan_of(queued) == self.scan_of(job):
                return reporter
        return None

    # --- the queue ----------------------------------------------------------------------------------------------
    def on_accepted(self, goal_handle) -> None:
        g = goal_handle.request
        job = Job(job_id=goal_id(goal_handle), robot=g.robot, scan_id=g.scan_id, scene_dir=g.scene_dir,
                  output=g.output, config_overrides=g.config_overrides, live=g.live, base_memory=g.base_memory)
        with self._start_lock:
            followed = self.goalless_live_job(job) if job.live else None
            if followed is not None and followed.attach(goal_handle):
                # the live job trains this scan already: the goal follows it (an executing goal from now on, its
                # execute callback waits for the job's end) instead of training the scan a second time
                self.goals[job.job_id] = followed
                goal_handle.execute()
                self.get_logger().info(f"live: goal {job.job_id[:8]} follows the live job of scan "
                                       f"{self.scan_of(job)[1]} already queued (its feedback, cancel and result)")
                return
            if job.live:
                self.followed.add(self.scan_of(job))
            reporter = Reporter(job.job_id, goal_handle)
            self.reporters[job.job_id] = self.goals[job.job_id] = reporter
            position = self.queue.add(job)
        reporter.feedback(queue_position=position, stage="queued")
        self.start_next()

    def start_next(self) -> None:
        """Start the first job if none runs: its goal's execute callback, or a thread for a goal-less job."""
        with self._start_lock:
            job = self.queue.start_next()
            if job is None:
                return
            reporter = self.reporters[job.job_id]
            if reporter.runs_in_goal:
                reporter.handle.execute()
            else:
                threading.Thread(target=self.run_job, args=(job, reporter), name="goalless-job",
                                 daemon=True).start()
        self.publish_positions()

    def publish_positions(self) -> None:
        for position, job in enumerate(self.queue.jobs()):
            reporter = self.reporters.get(job.job_id)
            if job.state == "queued" and reporter is not None and reporter.handle is not None and \
                    reporter.handle.is_active:
                reporter.feedback(queue_position=position, stage="queued")

    def on_cancel(self, goal_handle) -> CancelResponse:
        reporter = self.goals.get(goal_id(goal_handle))
        if reporter is not None and self.queue.remove_queued(reporter.job_id):
            self.reporters.pop(reporter.job_id, None)
            reporter.end(GoalStatus.STATUS_CANCELED,
                         Train.Result(success=False, message="cancelled while queued; it never ran"))
            if reporter.runs_in_goal:
                goal_handle.execute()   # its execute callback ends it as cancelled: a goal ends only there
            self.publish_positions()
        return CancelResponse.ACCEPT   # a running job notices the cancel between iterations

    def execute(self, goal_handle) -> Train.Result:
        """A goal's execute callback: it runs the goal's own job (started by `start_next`), or waits for the end of the
        job it follows (attached, or cancelled while queued); the goal ends with that job's status and result."""
        reporter = self.goals[goal_id(goal_handle)]
        try:
            if reporter.runs_in_goal and not reporter.ended.is_set():
                self.run_job(next(j for j in self.queue.jobs() if j.job_id == reporter.job_id), reporter)
            reporter.ended.wait()
        finally:
            self.goals.pop(goal_id(goal_handle), None)
        if reporter.status == GoalStatus.STATUS_SUCCEEDED:
            goal_handle.succeed()
        elif reporter.status == GoalStatus.STATUS_CANCELED:
            deadline = time.monotonic() + 5.0   # the cancel's state change follows its callback
            while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.01)
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return reporter.result

    def run_job(self, job: Job, reporter: Reporter) -> None:
        """Run one job to its end, which `reporter` records (the goal following it reports it). Then the next job
        starts."""
        status, result = GoalStatus.STATUS_ABORTED, Train.Result(success=False, message="the trainer stopped")
        try:
            result, status = self._run(job, reporter), GoalStatus.STATUS_SUCCEEDED
        except TrainingCancelled as exc:
            self.get_logger().info(str(exc))
            status, result = (GoalStatus.STATUS_CANCELED,
                              Train.Result(success=False, message=f"{exc}; the previous memory stays in service"))
        except JobError as exc:
            result = self._failed(str(exc))
        except (M3Error, ValueError, OSError) as exc:
            result = self._failed(f"training failed: {exc}")
        except Exception as exc:  # a bug: the client still learns what happened, the log gets the traceback
            self.get_logger().error(traceback.format_exc())
            result = self._failed(f"training failed: {type(exc).__name__}: {exc}")
        finally:
            self.queue.remove(job.job_id)
            self.reporters.pop(job.job_id, None)
            reporter.end(status, result)
            self.start_next()

    def _failed(self, message: str) -> Train.Result:
        self.get_logger().warning(message)
        return Train.Result(success=False, message=message)

    # --- one job ------------------------------------------------------------------------------------------------
    def _run(self, job: Job, reporter: Reporter) -> Train.Result:
        goal = Train.Goal(scene_dir=job.scene_dir, output=job.output, config_overrides=job.config_overrides,
                          robot=job.robot, scan_id=job.scan_id, live=job.live, base_memory=job.base_memory)
        try:
            plan = plan_goal(goal, self.scene_roots, self.output_root, self.config_path, self.storage, self.device)
        except (M3Error, ValueError, OSError) as exc:
            raise JobError(f"goal refused: {exc}") from exc
        fetched = ""
        if plan.scan_id and not plan.live:   # a live job pulls beside its training
            try:
                fetched = self.fetch(plan, reporter)
            except (M3Error, OSError) as exc:
                if reporter.cancelled:
                    raise TrainingCancelled("cancelled while fetching the scan") from exc
                raise JobError(f"fetching the scan failed: {exc}") from exc
            if not (plan.scene_dir / META_FILE).is_file():
                raise JobError(f"scan {plan.scan_id} of {plan.robot or 'this namespace'} holds no frame "
                               "(no scene.json)")
        extractors = Extractors(self.models, plan.config.device)   # built once for the job (a live job's every step)
        if plan.live:
            result = self._live(plan, reporter, extractors)
        elif plan.base_memory is not None:
            result = self._update(plan, reporter, extractors)
        else:
            result = self._train(plan, reporter, extractors)
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

    def fetch(self, plan: TrainJob, reporter: Reporter, stage: str | None = "fetching",
              should_stop: Callable[[], bool] = lambda: False) -> str:
        """Pull the job's scan unless held; returns what happened, for the result message. Its feedback says `stage`
        (None: only the bytes, for a live job's pull beside its training); `should_stop` ends it early too."""
        if held_manifest(plan.scene_dir) is not None:
            return f"scan {plan.scan_id} already held here"
        started, last = time.monotonic(), [0.0]

        def progress(stats: PullProgress) -> None:
            if stats.complete or time.monotonic() - last[0] > 0.25:   # feedback at most 4 Hz
                last[0] = time.monotonic()
                reporter.feedback(bytes_done=stats.bytes_done, bytes_total=stats.bytes_total,
                                  **({} if stage is None else {"queue_position": 0, "stage": stage}))

        self.get_logger().info(f"fetching scan {plan.scan_id} from {self.source(plan.robot).prefix} to "
                               f"{plan.scene_dir}")
        stats = self.source(plan.robot).pull("scan", plan.robot, plan.scan_id, plan.scene_dir, progress,
                                             lambda: reporter.cancelled or should_stop())
        seconds = time.monotonic() - started
        text = (f"fetched scan {plan.scan_id}: {stats.bytes_total / 1e6:.1f} MB in {stats.files} files "
                f"({stats.bytes_held / 1e6:.1f} MB held already) in {seconds:.1f} s, every file's sha256 verified"
                + (f", {stats.chunks_resent} corrupted chunk(s) re-sent" if stats.chunks_resent else ""))
        self.get_logger().info(text)
        return text

    def announce(self, job: TrainJob) -> None:
        """Tell the memory servers that `job.output` holds a new memory: its path on `m3/checkpoint` (a server on this
        disk), and for scan jobs robot, id and sha256 on `m3/trainer/memory_ready` (servers that fetch it)."""
        self.checkpoint_pub.publish(String(data=str(job.output)))
        if job.scan_id:
            self.ready_pub.publish(String(data=json.dumps({"robot": robot_name(job.robot), "id": job.output.stem,
                                                           "sha256": file_sha256(job.output)})))

    def _train(self, job: TrainJob, reporter: Reporter, extractors: Extractors) -> Train.Result:
        scene = Scene.load(job.scene_dir)
        self.get_logger().info(f"training {len(scene)} views of {job.scene_dir} for {job.config.iterations} "
                               f"iterations → {job.output}")
        started = time.monotonic()
        reporter.feedback(queue_position=0, stage="features", total_iterations=job.config.iterations)
        features = extractors.scene_features(scene, scene.root)
        reporter.feedback(stage="training")
        memory = train(scene, features, job.config, job.output, callback=progress_feedback(reporter),
                       should_cancel=lambda: reporter.cancelled)
        self.announce(job)   # no feedback after the last iteration's: the result describes the memory
        self.get_logger().info(f"memory written to {job.output} ({len(memory.gaussians)} Gaussians)")
        return result_of(memory, job, "trained", time.monotonic() - started)

    def replayed(self, memory: Memory, job: TrainJob, extractors: Extractors, skip: Path | None = None
                 ) -> list[SceneViews]:
        """The scans that built `memory` (its provenance), each with the views it gave, for an update to replay; a
        scan no longer on this disk (or `skip`, the scan being added) is left out, as the log says."""
        old = []
        for source, indices in recorded_views(memory, skip).items():
            root = Path(source)
            if not (root / META_FILE).is_file():
                self.get_logger().warning(f"{job.base_memory}: its scan {source} is not on this disk: the update "
                                          "does not replay it (its part of the memory may drift)")
                continue
            scene = Scene.load(root)
            old.append(SceneViews(scene, extractors.scene_features(scene, root), indices, source))
        return old

    def _update(self, job: TrainJob, reporter: Reporter, extractors: Extractors) -> Train.Result:
        """A base_memory goal: that memory, updated with the goal's scene (its training views), written to the
        output."""
        started = time.monotonic()
        memory, state = load_memory(job.base_memory, resolve_device(job.config.device))
        config = train_config_of(memory, job.overrides)
        scene = Scene.load(job.scene_dir)
        self.get_logger().info(f"updating {job.base_memory} ({len(memory.views.c2w)} views) with {len(scene)} views "
                               f"of {job.scene_dir} for {job.update.iterations} iterations → {job.output}")
        reporter.feedback(queue_position=0, stage="features", total_iterations=job.update.iterations)
        reporter.memory(memory)
        old = self.replayed(memory, job, extractors, skip=job.scene_dir)
        new = SceneViews(scene, extractors.scene_features(scene, scene.root),
                         training_views(len(scene), config.holdout_every), str(job.scene_dir))
        reporter.feedback(stage="updating")
        memory = update(memory, state, new, old, config, job.update, job.output, progress_feedback(reporter),
                        lambda: reporter.cancelled)
        self.announce(job)
        reporter.memory(memory, published=True)
        self.get_logger().info(f"memory written to {job.output} ({len(memory.views.c2w)} views, "
                               f"{len(memory.gaussians)} Gaussians)")
        return result_of(memory, job, f"updated {job.base_memory.name} with {len(scene)} views",
                         time.monotonic() - started)

    def _live(self, job: TrainJob, reporter: Reporter, extractors: Extractors) -> Train.Result:
        """A live job (module docstring): first memory, updates while the scan records, the final refinement."""
        started, settings = time.monotonic(), self.live
        device = resolve_device(job.config.device)
        stop_pull = threading.Event()

        def pull() -> str:
            return self.fetch(job, reporter, None, stop_pull.is_set)

        scan = GrowingScan(job.scene_dir, lambda: self.recorder_statuses.get(self.watch_recorder(job.robot)),
                           pull if job.scan_id else None, self.source_timeout_s)
        # the newest memory and the one before the last step (to redo that step as the final refinement)
        work = job.output.parent / f".{job.output.name}.live"
        before = job.output.parent / f".{job.output.name}.before"
        reporter.feedback(queue_position=0, stage="waiting")
        self.get_logger().info(f"live: training {job.scene_dir} while it records → {job.output}")
        memory, state, old = None, None, []
        if job.base_memory is not None:
            memory, state = load_memory(job.base_memory, device)
            old = self.replayed(memory, job, extractors, skip=job.scene_dir)
            write_atomic(before, lambda h: h.write(job.base_memory.read_bytes()))
            reporter.memory(memory)
        config = job.config if memory is None else train_config_of(memory, job.overrides)
        held = 0             # views of this scan in `memory`
        last_step = None     # views of this scan before the last step (None: no step yet)
        unpublished, published_at, published, steps, final = False, None, 0, 0, False
        try:
            while True:
                if reporter.cancelled:
                    raise TrainingCancelled("live training cancelled")
                ended = scan.ended()   # before reading: an ended scan's frames are all on disk by now
                scene = scan.scene()
                count = len(scene) if scene is not None else 0
                ready = count > held and (memory is not None or count >= settings.min_views)
                if ready or ended:
                    if count == 0:
                        raise JobError(f"the scan {job.scene_dir.name} ended with no keyframe")
                    # keyframes that arrived by the stop are served by an ordinary step first; then, nothing being
                    # new, that step is redone from the memory before it as the final refinement
                    final = ended and count == held
                    if final:
                        held = last_step
                        memory, state = (load_memory(before, device) if before.is_file() else (None, None))
                    iterations = (settings.final_iterations if final else settings.first_iterations
                                  if memory is None else settings.update_iterations)
                    step_started = time.monotonic()
                    features = extractors.scene_features(scene, scene.root)   # only new frames extracted
                    reporter.feedback(stage="refining" if final else "training" if memory is None else "live",
                                      iteration=0, total_iterations=iterations)
                    if work.is_file():
                        work.replace(before)
                    if memory is None:
                        train(scene, features, dataclasses.replace(config, iterations=iterations), work,
                              callback=progress_feedback(reporter), should_cancel=lambda: reporter.cancelled)
                    else:
                        new = SceneViews(scene, features, np.arange(held, count), str(job.scene_dir))
                        mine = [SceneViews(scene, features, np.arange(held), str(job.scene_dir))] if held else []
                        update(memory, state, new, [*old, *mine], config,
                               dataclasses.replace(job.update, iterations=iterations), work,
                               progress_feedback(reporter), lambda: reporter.cancelled)
                    memory, state = load_memory(work, device)   # the state the next step continues from
                    last_step, held, unpublished, steps = held, count, True, steps + 1
                    reporter.memory(memory)
                    self.get_logger().info(f"live: {count} views in memory after {iterations} iterations in "
                                           f"{time.monotonic() - step_started:.1f} s ({len(memory.gaussians)} "
                                           f"Gaussians, banks {memory.bank_sizes()})")
                due = published_at is None or time.monotonic() - published_at >= settings.publish_every_s
                if unpublished and (ended or due):
                    write_atomic(job.output, lambda h: h.write(work.read_bytes()))
                    self.announce(job)
                    published_at, unpublished, published = time.monotonic(), False, published + 1
                    reporter.memory(memory, published=True)
                    self.get_logger().info(f"live: published {job.output} ({held} views"
                                           + (", final)" if final else ")"))
                if final:
                    break
                if not ready:
                    time.sleep(LIVE_POLL_S)
                    reporter.feedback()   # the served memory's age keeps counting
        except JobError as exc:
            if reporter.cancelled:   # the pull noticed the cancel first
                raise TrainingCancelled("live training cancelled") from exc
            raise
        finally:
            stop_pull.set()
            scan.close()
            for path in (work, before):
                path.unlink(missing_ok=True)
        text = (f"live: {held} views in {steps} steps, {published} memories published"
                + (f"; {scan.fetched}" if scan.fetched else ""))
        return result_of(memory, job, text, time.monotonic() - started)


class GrowingScan:
    """A live job's scan directory, read as it grows. Only complete frames are read: the recorder writes a frame's
    images before its index line, and a pull writes the index after the images (m3_memory.core.storage). `pull`
    (a scan of another computer) runs in a thread beside the training; the scan has ended when it completed. A local
    scan has ended when `status()` (its recorder's latest) no longer names it as recording, or when no status
    arrived within `timeout_s` (no recorder: the directory is all there is)."""

    def __init__(self, root: Path, status: Callable[[], RecorderStatus | None], pull: Callable[[], str] | None,
                 timeout_s: float):
        self.root, self.status, self.timeout_s = root, status, timeout_s
        self.started = time.monotonic()
        self.fetched, self.failed = "", ""
        self.pulled = threading.Event()
        self.thread = None
        if pull is not None:
            self.thread = threading.Thread(target=self._pull, args=(pull,), name="live-pull", daemon=True)
            self.thread.start()

    def _pull(self, pull: Callable[[], str]) -> None:
        try:
            self.fetched = pull()
        except (M3Error, OSError) as exc:
            self.failed = str(exc)
        finally:
            self.pulled.set()

    def ended(self) -> bool:
        """Whether every frame of the scan is on this disk; JobError when its pull failed."""
        if self.thread is not None:
            if self.failed:
                raise JobError(f"fetching the scan failed: {self.failed}")
            return self.pulled.is_set()
        status = self.status()
        if status is None:
            return time.monotonic() - self.started > self.timeout_s
        return not (status.recording and Path(status.scene_dir).expanduser().resolve() == self.root)

    def scene(self) -> Scene | None:
        """The frames written so far (None before the first: the scene's files appear before its first index line)."""
        index = self.root / INDEX_FILE
        if not (self.root / META_FILE).is_file() or not index.is_file() or b"\n" not in index.read_bytes():
            return None
        return Scene.load(self.root)

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=PULL_STOP_S)


def goal_id(goal_handle) -> str:
    """A goal's UUID as hex: the id of the job it asked for."""
    return bytes(goal_handle.goal_id.uuid).hex()


def progress_feedback(reporter: Reporter) -> Callable:
    """The training/update callback that sends a Progress as feedback."""
    def feedback(progress) -> None:
        reporter.feedback(iteration=progress.iteration, total_iterations=progress.total, loss=progress.loss,
                          rgb_loss=progress.rgb_loss, feature_loss=progress.feature_loss,
                          elapsed_seconds=progress.elapsed_s, eta_seconds=progress.eta_s,
                          num_gaussians=progress.num_gaussians)
    return feedback


def result_of(memory: Memory, job: TrainJob, message: str, seconds: float) -> Train.Result:
    final = memory.config["final"]
    return Train.Result(success=True, message=message, checkpoint=str(job.output), iterations=memory.iteration,
                        final_loss=final["loss"], psnr=final["psnr"], num_gaussians=len(memory.gaussians),
                        train_seconds=seconds)


def main(args: list[str] | None = None) -> int:
    return spin_node(Trainer, args, threads=6)
