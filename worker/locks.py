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

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._fd = None


class HostLocks:
    """Each job's lock file is opened once and kept open; a run only locks and
    unlocks it (a daemon with short intervals takes thousands a second)."""

    def __init__(self, directory: str | os.PathLike | None, database_url: str) -> None:
        self.directory = Path(directory) if directory else default_lock_dir()
        # Same job name against another database is another job.
        self._scope = hashlib.sha256(database_url.encode()).hexdigest()[:12]
        self._fds: dict[str, int] = {}
        self._pid = f"{os.getpid()}\n".encode().ljust(12)

    def path_for(self, job_name: str) -> Path:
        return self.directory / f"{job_name}.{self._scope}.lock"

    def _fd(self, job_name: str) -> int:
        fd = self._fds.get(job_name)
        if fd is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path_for(job_name), os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[job_name] = fd
        return fd

    def try_acquire(self, job_name: str) -> JobLock | None:
        """The job's lock, or None when another process holds it right now."""
        fd = self._fd(job_name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        os.pwrite(fd, self._pid, 0)         # who holds it, for the other's message
        return JobLock(fd)

    def holder(self, job_name: str) -> str:
        try:
            return self.path_for(job_name).read_text().strip() or "?"
        except OSError:
            return "?"

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
