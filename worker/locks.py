"""Host-wide locks, one per job: a job never runs twice at once on one host, even
across processes (two cron invocations, or a cron run beside the daemon)."""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path


def default_lock_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"run-worker-{os.getuid()}"


class JobLock:
    """An flock held while a job runs; the kernel drops it if the process dies."""

    def __init__(self, path: Path, handle) -> None:
        self.path = path
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class HostLocks:
    def __init__(self, directory: str | os.PathLike | None, database_url: str) -> None:
        self.directory = Path(directory) if directory else default_lock_dir()
        # Same job name against another database is another job.
        self._scope = hashlib.sha256(database_url.encode()).hexdigest()[:12]

    def path_for(self, job_name: str) -> Path:
        return self.directory / f"{job_name}.{self._scope}.lock"

    def try_acquire(self, job_name: str) -> JobLock | None:
        """The job's lock, or None when another run of it holds it right now."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path_for(job_name)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return JobLock(path, handle)

    def holder(self, job_name: str) -> str:
        try:
            return self.path_for(job_name).read_text().strip() or "?"
        except OSError:
            return "?"
