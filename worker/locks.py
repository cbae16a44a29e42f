"""Host-wide locks, one per job: a job never runs twice at once on one host, even
across processes (two cron invocations, or a cron run beside the daemon).

A lock is an flock on a file in a directory only this user can write to. The
directory is checked once, and held open: lock files are opened relative to it,
never through a symbolic link. Each job's file is opened once and kept open, up to
a bound well below the open-file limit; a run then costs the two flock calls only.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pwd
import re
import resource
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

NAME_MAX = 255               # bytes in one file name (Linux, and most file systems)
MAX_OPEN_LOCK_FILES = 256    # lock files kept open at most, whatever the fd limit


class LockDirectoryError(Exception):
    """The lock directory cannot be trusted or used: nothing may run (exit 78)."""

    def __init__(self, directory: Path, problem: str) -> None:
        super().__init__(f"lock directory {directory} {problem}")
        self.directory = directory


def default_lock_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"run-worker-{os.getuid()}"


def open_file_budget() -> int:
    """How many lock files may stay open: a quarter of the soft fd limit, at most
    MAX_OPEN_LOCK_FILES, so connections, logs and the jobs keep the rest."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_OPEN_LOCK_FILES
    return max(1, min(MAX_OPEN_LOCK_FILES, soft // 4))


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def open_lock_directory(directory: Path) -> int:
    """A descriptor on `directory` (created if missing), once it is known that only
    this user can add or replace files in it: otherwise another local user could
    plant a link there and have us open, or lock, a file of their choosing."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        pass    # not a directory, or a dangling link: the open below says which
    except OSError as exc:
        raise LockDirectoryError(directory, f"cannot be created: {exc.strerror}") from exc
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # O_NOFOLLOW | O_DIRECTORY on a link: ELOOP or ENOTDIR, depending on the kernel.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and directory.is_symlink():
            owner = _user(os.lstat(directory).st_uid)
            raise LockDirectoryError(directory, f"is a symbolic link (owned by {owner}); "
                                     f"refusing to follow it: give the real directory "
                                     f"as worker.lock_dir") from exc
        raise LockDirectoryError(directory, f"cannot be opened: {exc.strerror}") from exc
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = (f"is owned by {_user(info.st_uid)}, not by this user "
                   f"({_user(os.geteuid())})")
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = (f"(owned by {_user(info.st_uid)}) is writable by its group or by "
                   f"others (mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it")
    if problem is not None:
        os.close(fd)
        raise LockDirectoryError(directory, problem + ": another user could plant links "
                                 "in it; refusing it (set worker.lock_dir, or remove it)")
    return fd


# Query keys and ODBC attributes whose values are credentials.
_CREDENTIAL_KEY = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)
_ODBC_CREDENTIAL = re.compile(
    r"(?:^|;)\s*[^;=]*(?:pass|pwd|secret|token|key)[^;=]*=\s*(?:\{(?:[^}]|\}\})*\}|[^;]*)",
    re.IGNORECASE)
_URL_USERINFO_PASSWORD = re.compile(r"(//[^/:@]*):[^/]*@")


def database_identity(url: str) -> str:
    """The URL without anything credential-shaped: which database a lock is for.
    The lock file's name embeds a hash of it, and a short unsalted hash of a
    password is a guessing oracle for anyone who can list the directory."""
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except ArgumentError:
        return _ODBC_CREDENTIAL.sub("", _URL_USERINFO_PASSWORD.sub(r"\1@", url))
    query = {}
    for key, value in parsed.query.items():
        if _CREDENTIAL_KEY.search(key):
            continue
        if key.lower() == "odbc_connect":
            value = (_ODBC_CREDENTIAL.sub("", value) if isinstance(value, str)
                     else tuple(_ODBC_CREDENTIAL.sub("", v) for v in value))
        query[key] = value
    # URL.set(password=None) would keep the password ("None" means "unchanged").
    without = URL.create(parsed.drivername, parsed.username, None, parsed.host,
                         parsed.port, parsed.database, query)
    return without.render_as_string(hide_password=False)


def lock_file_name(job_name: str, scope: str) -> str:
    """`job.scope.lock`; a name too long for the file system keeps a prefix and
    gains a hash of the whole name, so distinct jobs keep distinct files."""
    suffix = f".{scope}.lock"
    name = job_name.encode()
    if len(name) + len(suffix) > NAME_MAX:
        digest = hashlib.sha256(name).hexdigest()[:16]
        keep = NAME_MAX - len(suffix) - len(digest) - 1
        name = name[:keep] + b"~" + digest.encode()
    return name.decode(errors="ignore") + suffix


def flock_holder(device: int, inode: int) -> int | None:
    """The pid holding an flock on this file, from /proc/locks (Linux); None if
    unknown. Read only when a lock was refused, so a run never pays for it."""
    wanted = f"{os.major(device):02x}:{os.minor(device):02x}:{inode}"
    try:
        with open("/proc/locks") as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                    pid = int(fields[4])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


class JobLock:
    """An flock held while a job runs; the kernel drops it if the process dies."""

    def __init__(self, owner: "HostLocks", job_name: str, fd: int) -> None:
        self._owner = owner
        self._job_name = job_name
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            self._owner._release(self._job_name, self._fd)
            self._fd = None


class HostLocks:
    """The host locks of one database's jobs. Thread-safe: a lock may be released
    from the job's thread while the loop takes others."""

    def __init__(self, directory: str | os.PathLike | None, database_url: str) -> None:
        self.directory = Path(directory) if directory else default_lock_dir()
        # Same job name against another database is another job.
        self._scope = hashlib.sha256(database_identity(database_url).encode()).hexdigest()[:12]
        self.max_open = open_file_budget()
        self._dir_fd: int | None = open_lock_directory(self.directory)
        self._open: OrderedDict[str, int] = OrderedDict()   # least recently used first
        self._locked: set[str] = set()
        self._guard = threading.Lock()

    def path_for(self, job_name: str) -> Path:
        return self.directory / lock_file_name(job_name, self._scope)

    def try_acquire(self, job_name: str) -> JobLock | None:
        """The job's lock, or None when a run of it holds the lock right now (in
        another process, or in this one). OSError if its file cannot be opened."""
        with self._guard:
            if self._dir_fd is None:
                raise RuntimeError("HostLocks used after close()")
            if job_name in self._locked:
                return None
            fd = self._open.get(job_name)
            if fd is None:
                fd = self._open_file(job_name)
                self._open[job_name] = fd
                self._close_unused(keep=job_name)
            else:
                self._open.move_to_end(job_name)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            self._locked.add(job_name)
        return JobLock(self, job_name, fd)

    def _open_file(self, job_name: str) -> int:
        name = lock_file_name(job_name, self._scope)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(exc.errno, "lock file is a symbolic link; refusing to "
                              "follow it", str(self.directory / name)) from exc
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "lock file is not a regular file",
                          str(self.directory / name))
        return fd

    def _close_unused(self, keep: str) -> None:
        """Close the least recently used unlocked files beyond the budget, but
        not `keep`'s (about to be locked): a locked file stays open, since closing
        it would drop its lock."""
        excess = len(self._open) - self.max_open
        if excess <= 0:
            return
        unused = []
        for name in self._open:
            if name not in self._locked and name != keep:
                unused.append(name)
                if len(unused) == excess:
                    break
        for name in unused:
            os.close(self._open.pop(name))

    def _release(self, job_name: str, fd: int) -> None:
        with self._guard:
            if self._open.get(job_name) != fd or job_name not in self._locked:
                return     # closed meanwhile: the close dropped the lock
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._locked.discard(job_name)

    def holder(self, job_name: str) -> str:
        """The pid holding the job's lock, as text; '?' when unknown."""
        with self._guard:
            dir_fd = self._dir_fd
            if dir_fd is None:
                return "?"
            try:
                info = os.stat(lock_file_name(job_name, self._scope), dir_fd=dir_fd,
                               follow_symlinks=False)
            except OSError:
                return "?"
        pid = flock_holder(info.st_dev, info.st_ino)
        return str(pid) if pid is not None else "?"

    def open_files(self) -> int:
        """How many lock files are open right now."""
        with self._guard:
            return len(self._open)

    def close(self) -> None:
        with self._guard:
            for fd in self._open.values():
                os.close(fd)
            self._open.clear()
            self._locked.clear()
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
