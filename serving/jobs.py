"""Background jobs (add-folder) in the gallery worker: queued, running, done, failed, cancelled.

A job runs on the job thread(s) of the worker process, beside the request threads, so
searches keep being answered while it runs. It reports progress through `Job.advance`
(files handled) and its `IngestReport`; a cancel sets the job's event, which the ingest loop
checks between batches. Ingest stores one whole batch per transaction, so a cancelled job
leaves whole records only, and adding the folder again finishes the rest (stored files are
unchanged and skipped).

Jobs live in memory: they are progress reports, not a work queue that survives a restart
(what they stored does). Finished jobs are forgotten after `keep` newer ones.
A job belongs to one gallery: another gallery's job id answers 404, like an unknown id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from serving.errors import GalleryError, not_found
from serving.ingest import MAX_LISTED, IngestCancelled, IngestReport

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")


@dataclass
class Job:
    job_id: str
    user_id: str
    kind: str
    folder: str
    state: str = "queued"
    total: int = 0
    done: int = 0
    report: IngestReport = field(default_factory=IngestReport)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self, files: int) -> None:
        with self._lock:
            self.done += files

    def public(self) -> dict:
        with self._lock:
            report = self.report
            end = self.finished_at or time.time()
            elapsed = end - self.started_at if self.started_at else 0.0
            return {
                "job_id": self.job_id, "kind": self.kind, "folder": self.folder, "state": self.state,
                "total": self.total, "done": self.done, "added": report.added, "updated": report.updated,
                "unchanged": report.unchanged, "duplicates": len(report.duplicates), "failed": len(report.failures),
                "ignored": report.ignored, "removed": len(report.removed), "failed_files": list(report.failures[:MAX_LISTED]),
                "images_per_second": round(self.done / elapsed, 2) if elapsed > 0 else 0.0,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "error": self.error,
            }


class JobManager:
    """Runs jobs on `workers` threads (one by default: ingest already uses every core)."""

    def __init__(self, workers: int = 1, keep: int = 200):
        self._executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self.keep = keep

    def submit(self, user_id: str, kind: str, folder: str, work: Callable[[Job], None]) -> Job:
        job = Job(job_id=uuid.uuid4().hex, user_id=user_id, kind=kind, folder=folder)
        with self._lock:
            self._jobs[job.job_id] = job
            self._forget_old()
        self._executor.submit(self._run, job, work)
        return job

    def _forget_old(self) -> None:
        finished = [jid for jid, job in self._jobs.items() if job.state not in ACTIVE]
        for jid in finished[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[jid]

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        if job.cancel.is_set():
            self._finish(job, "cancelled")
            return
        with job._lock:
            job.state, job.started_at = "running", time.time()
        try:
            work(job)
        except IngestCancelled as error:
            self._finish(job, "cancelled" if job.cancel.is_set() else "failed", None if job.cancel.is_set() else str(error))
        except GalleryError as error:
            self._finish(job, "failed", error.detail)
        except Exception as error:  # reported on the job, logged with its traceback
            logger.exception("job %s failed", job.job_id)
            self._finish(job, "failed", f"internal error: {error}")
        else:
            self._finish(job, "cancelled" if job.cancel.is_set() else "done")

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        with job._lock:
            job.state, job.error, job.finished_at = state, error, time.time()
        logger.info("job %s (%s %s): %s, %d/%d files", job.job_id, job.kind, job.folder, state, job.done, job.total)

    def get(self, user_id: str, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.user_id != user_id:
            raise not_found(f"no job {job_id!r} in this gallery")
        return job

    def cancel(self, user_id: str, job_id: str) -> Job:
        """Ask a queued or running job to stop; it ends between two batches (poll for `cancelled`).
        A job that already ended is returned as it is."""
        job = self.get(user_id, job_id)
        with job._lock:
            if job.state not in ACTIVE:
                return job
            job.cancel.set()
            if job.state == "queued":  # never started: final at once
                job.state, job.finished_at = "cancelled", time.time()
        return job

    def shutdown(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
