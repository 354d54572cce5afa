"""The trainer's FIFO job queue, persisted as JSON in the storage root (`queue.json`, written atomically).

A job is self-contained: which scan (robot + scan id, fetched by id from that robot's recorder) or which local scene
directory, the output name and the YAML overrides. The job running now stays first in the file (`state: running`)
until it ends, so a worker restarted mid-job runs it again, then the rest in order.

Several workers later: because a job names its scan by robot and id (any worker can fetch it from the recorder) and
carries all its settings, a second worker needs no shared disk. A dispatcher would keep one such queue and hand each
job to an idle worker's `m3/train` action (workers in their own namespaces, e.g. `/worker2/m3/train`); or each worker
keeps its own queue and a client picks the shortest (the feedback's `queue_position`). No scheduler exists yet.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from m3_memory.core.atomic import write_atomic
from m3_memory.core.errors import M3Error

QUEUE_FILE = "queue.json"
QUEUE_FORMAT = "m3-train-queue/1"


@dataclass
class Job:
    """One training request. `job_id` is the action goal's UUID (hex)."""
    job_id: str
    robot: str = ""
    scan_id: str = ""
    scene_dir: str = ""
    output: str = ""
    config_overrides: str = ""
    live: bool = False               # refine while the scan records (m3_memory.ros.trainer's live mode)
    base_memory: str = ""            # a memory to update with the scan instead of training from scratch
    state: str = "queued"            # queued | running
    accepted: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class JobQueue:
    """Thread-safe FIFO of jobs, saved to `path` after every change."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._jobs: list[Job] = []

    def load(self) -> list[Job]:
        """Read the saved queue (an absent file is an empty queue); returns the jobs in order, all queued."""
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != QUEUE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {QUEUE_FORMAT!r}")
            jobs = [Job(**{**entry, "state": "queued"}) for entry in data["jobs"]]   # the interrupted one runs again
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise M3Error(f"{self.path} is not a training queue ({exc}); move it away to start with an empty one") \
                from exc
        with self._lock:
            self._jobs = jobs
        return list(jobs)

    def _save(self) -> None:
        data = {"format": QUEUE_FORMAT, "jobs": [asdict(job) for job in self._jobs]}
        write_atomic(self.path, lambda h: h.write((json.dumps(data, indent=1) + "\n").encode()))

    def add(self, job: Job) -> int:
        """Append `job`; returns the jobs ahead of it."""
        with self._lock:
            self._jobs.append(job)
            self._save()
            return len(self._jobs) - 1

    def remove(self, job_id: str) -> Job | None:
        with self._lock:
            for job in self._jobs:
                if job.job_id == job_id:
                    self._jobs.remove(job)
                    self._save()
                    return job
        return None

    def remove_queued(self, job_id: str) -> bool:
        """Remove `job_id` if it waits (not running); whether it did."""
        with self._lock:
            for job in self._jobs:
                if job.job_id == job_id and job.state == "queued":
                    self._jobs.remove(job)
                    self._save()
                    return True
        return False

    def start_next(self) -> Job | None:
        """Mark the first job running and return it; None when one runs already or none waits."""
        with self._lock:
            if not self._jobs or self._jobs[0].state == "running":
                return None
            self._jobs[0].state = "running"
            self._save()
            return self._jobs[0]

    def position(self, job_id: str) -> int | None:
        """Jobs ahead of `job_id` (0 = it runs or runs next); None when it is not queued."""
        with self._lock:
            for i, job in enumerate(self._jobs):
                if job.job_id == job_id:
                    return i
        return None

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)
