"""Host-wide locks, one per job: a job never runs twice at once on one host, even
across processes (two cron invocations, or a cron run beside the daemon).

All the jobs of one database share one lock file, `<scope>.locks`, in a directory
only this user can write to. The directory is checked once; the file is opened
once, relative to it and never through a symbolic link, and kept open. A job's lock
is a write lock on one byte of that file, at an offset hashed from the job name: an
open-file-description (OFD) lock on Linux, a classic POSIX record lock elsewhere.
A run then costs two fcntl calls and nothing else; nothing is written to the file.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pwd
import re
import stat
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (64-bit off_t),
# l_pid (int), in native alignment (32 bytes on 64-bit systems, with the padding).
# F_OFD_* exist only on Linux, the one layout needed.
FLOCK = struct.Struct("hhqqi4x")
# The classic fallback goes through fcntl.lockf, which packs the platform's struct.
LOCKF_OPERATION = {fcntl.F_WRLCK: fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.F_UNLCK: fcntl.LOCK_UN}
HOLDER_CACHE_SECONDS = 1.0   # how long one /proc scan answers holder() for


class LockDirectoryError(Exception):
    """The lock directory, or the lock file in it, cannot be trusted or used:
    nothing may run (exit 78)."""

    def __init__(self, path: Path, problem: str, *, kind: str = "lock directory") -> None:
        super().__init__(f"{kind} {path} {problem}")
        self.path = path


def default_lock_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"run-worker-{os.getuid()}"


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


def database_scope(url: str) -> str:
    """The name the files of one database's jobs have in a lock directory (the lock
    file, worker.control's socket): the same job name against another database is
    another job."""
    return hashlib.sha256(database_identity(url).encode()).hexdigest()[:12]


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


def lock_offset(job_name: str) -> int:
    """The byte of the lock file that is `job_name`'s lock: 62 bits of a SHA-256 of
    the name (positive, and far below the largest off_t). Two names out of 30,000
    share one with a probability of about 1e-10; they would then take turns."""
    digest = hashlib.sha256(job_name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def open_lock_file(dir_fd: int, path: Path) -> int:
    """A descriptor on the lock file `path` (created if missing) in the checked
    directory `dir_fd`: never through a symbolic link, and only a regular file."""
    try:
        fd = os.open(path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockDirectoryError(path, "is a symbolic link; refusing to follow it "
                                     "(remove it)", kind="lock file") from exc
        raise LockDirectoryError(path, f"cannot be opened: {exc.strerror}",
                                 kind="lock file") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockDirectoryError(path, "is not a regular file; refusing it (remove it)",
                                 kind="lock file")
    return fd


def ofd_locks_work(fd: int) -> bool:
    """Whether this system has OFD locks: Linux 3.15 or later. Elsewhere Python has
    no F_OFD_SETLK; an older Linux kernel rejects the command with EINVAL."""
    if not hasattr(fcntl, "F_OFD_GETLK"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def posix_lock_holder(fd: int, offset: int) -> int | None:
    """The pid holding a classic POSIX lock on the byte at `offset` (F_GETLK
    reports it); None if the byte is free, or off Linux, whose struct flock
    layout FLOCK is."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK,
                             FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    except OSError:
        return None
    lock_type, _whence, _start, _length, pid = FLOCK.unpack(answer)
    return pid if lock_type != fcntl.F_UNLCK and pid > 0 else None


def ofd_lock_holders(device: int, inode: int, file_name: str) -> list[tuple[int, int, int]]:
    """(first byte, last byte, pid) of each OFD lock on the file (device, inode)
    held by a process of this user. /proc/locks shows pid -1 for OFD locks, but
    /proc/<pid>/fdinfo/<fd> lists the locks held through that fd. Processes come
    and go while this reads: whatever cannot be read is passed over. Empty off
    Linux."""
    wanted = f"{os.major(device):02x}:{os.minor(device):02x}:{inode}"
    suffixes = (f"/{file_name}", f"/{file_name} (deleted)")
    uid = os.geteuid()
    held: list[tuple[int, int, int]] = []
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return held
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                # The link's name is a cheap filter; the lock lines' dev:ino decide.
                if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(suffixes):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    lines = info.read().splitlines()
            except OSError:
                continue
            held.extend((start, end, int(pid)) for start, end in _ofd_ranges(lines, wanted))
    return held


def _ofd_ranges(fdinfo_lines: list[str], wanted: str) -> list[tuple[int, int]]:
    """The byte ranges of the OFD locks on file `wanted` (dev:ino) in an fdinfo,
    whose lock lines read `lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:2146818 7 7`
    (the kernel merges adjacent ranges of one holder; `EOF` ends an open range)."""
    ranges = []
    for line in fdinfo_lines:
        fields = line.split()
        if len(fields) < 9 or fields[0] != "lock:" or fields[2] != "OFDLCK" \
                or "->" in fields or wanted not in fields:
            continue
        at = fields.index(wanted)
        try:
            start = int(fields[at + 1])
            end = sys.maxsize if fields[at + 2] == "EOF" else int(fields[at + 2])
        except (IndexError, ValueError):
            continue
        ranges.append((start, end))
    return ranges


class JobLock:
    """A job's lock, held while it runs; the kernel drops it if the process dies."""

    def __init__(self, owner: "HostLocks", job_name: str, fd: int, offset: int) -> None:
        self._owner = owner
        self._job_name = job_name
        self._fd: int | None = fd
        self._offset = offset

    def release(self) -> None:
        if self._fd is not None:
            self._owner._release(self._fd, self._offset)
            self._fd = None


class HostLocks:
    """The host locks of one database's jobs: one file, one byte-range lock per job.
    Thread-safe: a lock may be released from the job's thread while the loop takes
    others (OFD locks belong to the open file description, which all threads share)."""

    def __init__(self, directory: str | os.PathLike | None, database_url: str) -> None:
        self.directory = Path(directory) if directory else default_lock_dir()
        self.path = self.directory / f"{database_scope(database_url)}.locks"
        dir_fd = open_lock_directory(self.directory)
        try:
            self._fd: int | None = open_lock_file(dir_fd, self.path)
        finally:
            os.close(dir_fd)      # the one file is open: the directory is not needed again
        info = os.fstat(self._fd)
        self._device, self._inode = info.st_dev, info.st_ino
        # Without OFD locks, classic POSIX record locks: they belong to the process,
        # which is enough with one descriptor per file per HostLocks; but a second
        # HostLocks on the same file in this process would not exclude the first, and
        # closing it would drop the first one's locks. OFD locks have neither problem.
        self._ofd = ofd_locks_work(self._fd)
        # Offsets this HostLocks holds: the kernel lets an open file description take
        # its own lock again, so one process's runs are kept apart here.
        self._locked_offsets: set[int] = set()
        self._guard = threading.Lock()
        self.holder_cache_seconds = HOLDER_CACHE_SECONDS
        self._holders: tuple[float, list[tuple[int, int, int]]] | None = None
        self._holders_guard = threading.Lock()

    def try_acquire(self, job_name: str) -> JobLock | None:
        """The job's lock, or None when a run of it holds the lock right now (in
        another process, or in this one)."""
        offset = lock_offset(job_name)
        with self._guard:
            if self._fd is None:
                raise RuntimeError("HostLocks used after close()")
            if offset in self._locked_offsets:
                return None
            if not self._set_lock(fcntl.F_WRLCK, offset):
                return None
            self._locked_offsets.add(offset)
            return JobLock(self, job_name, self._fd, offset)

    def _set_lock(self, lock_type: int, offset: int) -> bool:
        """Take (F_WRLCK) or give back (F_UNLCK) the byte at `offset`, without
        waiting: one fcntl call. False if another open file description (or, in the
        classic fallback, another process) holds it."""
        try:
            if self._ofd:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK,
                            FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0))
            else:
                fcntl.lockf(self._fd, LOCKF_OPERATION[lock_type], 1, offset, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _release(self, fd: int, offset: int) -> None:
        with self._guard:
            if self._fd != fd or offset not in self._locked_offsets:
                return     # closed meanwhile: the close dropped the lock
            self._set_lock(fcntl.F_UNLCK, offset)
            self._locked_offsets.discard(offset)

    def holder(self, job_name: str) -> str:
        """The pid holding the job's lock, as text; '?' when unknown. Called only
        when a lock was refused, so a run never pays for it."""
        offset = lock_offset(job_name)
        with self._guard:
            if self._fd is None:
                return "?"
            if offset in self._locked_offsets:
                return str(os.getpid())
            if not self._ofd:
                pid = posix_lock_holder(self._fd, offset)
                return str(pid) if pid is not None else "?"
        for start, end, pid in self._lock_table():
            if start <= offset <= end:
                return str(pid)
        return "?"

    def _lock_table(self) -> list[tuple[int, int, int]]:
        """The OFD locks on our file, at most holder_cache_seconds old: a batch whose
        every job is refused reads /proc once a second, not once per job."""
        with self._holders_guard:
            now = time.monotonic()
            if self._holders is None or now - self._holders[0] >= self.holder_cache_seconds:
                self._holders = (now, ofd_lock_holders(self._device, self._inode,
                                                        self.path.name))
            return self._holders[1]

    def open_files(self) -> int:
        """How many lock files are open right now: 1, or 0 after close()."""
        with self._guard:
            return 0 if self._fd is None else 1

    def close(self) -> None:
        """Close the lock file, which drops every lock still held through it."""
        with self._guard:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._locked_offsets.clear()
