"""Host locks (issue 10 item 9, issue 12's lock cost): a lock directory another user
could write to is refused, no link is followed, no credential reaches a file name,
one lock file per database is open whatever the number of jobs, and a run costs its
two fcntl calls only; two processes still never run one job at once, and the one
holding a lock is named."""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import worker.locks
from tests.conftest import ROOT
from worker.locks import (FLOCK, HostLocks, LockDirectoryError, database_identity,
                          lock_offset, ofd_lock_holders)

URL = "mysql+pyodbc://worker:s3cret@db.example/app?driver=MariaDB+Unicode"
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def lock_file_path(directory: Path, url: str) -> Path:
    """Where a database's lock file is: `<scope>.locks`, the scope 12 hex digits of
    a SHA-256 of the URL without its credentials."""
    scope = hashlib.sha256(database_identity(url).encode()).hexdigest()[:12]
    return directory / f"{scope}.locks"


def run_python(code: str, *, nofile: int | None = None, **env: str) -> str:
    """Run `code` in a fresh interpreter (optionally under `ulimit -n nofile`)."""
    def limit():
        if nofile is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, preexec_fn=limit,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_root
def test_the_default_lock_directory_owned_by_another_user_is_refused(tmp_path,
                                                                     monkeypatch):
    """The reported attack: without XDG_RUNTIME_DIR the locks go to
    $TMPDIR/run-worker-UID, which another user can create first."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)       # re-read TMPDIR
    planted = tmp_path / f"run-worker-{os.getuid()}"
    planted.mkdir(mode=0o755)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(LockDirectoryError) as refused:
        HostLocks(None, URL)
    message = str(refused.value)
    assert str(planted) in message and "uid 65534" in message
    assert "s3cret" not in message
    assert list(planted.iterdir()) == []


def test_a_lock_directory_writable_by_others_is_refused(tmp_path):
    shared = private_dir(tmp_path / "locks")
    shared.chmod(0o777)
    with pytest.raises(LockDirectoryError, match="writable by its group or by others"):
        HostLocks(shared, URL)
    shared.chmod(0o770)
    with pytest.raises(LockDirectoryError, match=str(shared)):
        HostLocks(shared, URL)
    shared.chmod(0o700)
    HostLocks(shared, URL).close()


def test_a_symbolic_link_as_lock_directory_is_refused(tmp_path):
    target = private_dir(tmp_path / "elsewhere")
    link = tmp_path / "locks"
    link.symlink_to(target)
    with pytest.raises(LockDirectoryError, match="is a symbolic link"):
        HostLocks(link, URL)
    assert list(target.iterdir()) == []


def test_a_link_planted_as_the_lock_file_is_refused_and_never_followed(tmp_path):
    directory = private_dir(tmp_path / "locks")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock_file = lock_file_path(directory, URL)
    lock_file.symlink_to(victim)
    with pytest.raises(LockDirectoryError) as refused:
        HostLocks(directory, URL)
    assert str(refused.value) == (f"lock file {lock_file} is a symbolic link; "
                                  f"refusing to follow it (remove it)")
    assert victim.read_text() == "precious\n"
    assert lock_file.is_symlink()


def test_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path):
    directory = private_dir(tmp_path / "locks")
    os.mkfifo(lock_file_path(directory, URL), 0o600)   # O_NONBLOCK: the open does not hang
    with pytest.raises(LockDirectoryError, match="is not a regular file"):
        HostLocks(directory, URL)


def test_the_cli_refuses_a_planted_lock_file_link_with_78_in_one_line(tmp_path):
    directory = private_dir(tmp_path / "locks")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    config = batch_config(tmp_path, directory, 1)
    lock_file = lock_file_path(directory, f"sqlite:///{tmp_path / 'w.db'}")
    lock_file.symlink_to(victim)
    done = cli(["--once", "-c", str(config)])
    assert done.returncode == 78, done.stderr
    assert f"lock file {lock_file} is a symbolic link; refusing to follow it" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert victim.read_text() == "precious\n"


def test_a_new_lock_directory_is_private(tmp_path):
    directory = tmp_path / "new" / "locks"
    HostLocks(directory, URL).close()
    assert (directory.stat().st_mode & 0o777) == 0o700


def test_the_lock_file_name_does_not_depend_on_credentials(tmp_path):
    directory = private_dir(tmp_path / "locks")

    def name(url: str) -> str:
        locks = HostLocks(directory, url)
        try:
            return locks.path.name
        finally:
            locks.close()

    base = name(URL)
    assert base == lock_file_path(directory, URL).name
    assert re.fullmatch(r"[0-9a-f]{12}\.locks", base)
    assert name(URL.replace("s3cret", "other")) == base
    assert name(URL.replace("worker:s3cret@", "worker@")) == base
    assert name(URL + "&PWD=a1") == name(URL + "&PWD=b2") == base
    assert name(URL + "&api_token=a1") == base
    odbc = "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BX%7D%3BSERVER%3Dh%3BPWD%3D%7Ba%3Bb%7D"
    assert name(odbc) == name(odbc.replace("PWD%3D%7Ba%3Bb%7D", "PWD%3Dz"))
    # Another database (or user) is another lock file (every job of one database
    # shares it: the next test).
    assert name(URL.replace("/app", "/other")) != base
    assert name(URL.replace("worker:", "admin:")) != base


def test_one_private_empty_lock_file_per_database_whatever_the_jobs(tmp_path):
    directory = private_dir(tmp_path / "locks")
    locks = HostLocks(directory, URL)
    try:
        for n in range(50):
            held = locks.try_acquire(f"job-{n}")
            assert held is not None
            held.release()
        assert locks.open_files() == 1
        (only,) = directory.iterdir()
        assert only == locks.path
        info = only.stat()
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size == 0                       # nothing is written to it
    finally:
        locks.close()
    assert locks.open_files() == 0


def test_the_flock_struct_packs_as_the_kernel_reads_it(tmp_path):
    """Two open()s of one file are two open file descriptions: an OFD lock through
    one is seen, and refused, through the other, in one process; F_OFD_GETLK gives
    back the packed range, type and the OFD pid -1."""
    path = tmp_path / "file"
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    second = os.open(path, os.O_RDWR)
    try:
        assert FLOCK.size == 32 or sys.maxsize < 2 ** 32        # x86-64: hhqqi + 4 pad
        offset = lock_offset("job")
        assert 0 < offset < 2 ** 62
        fcntl.fcntl(first, fcntl.F_OFD_SETLK,
                    FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        seen = FLOCK.unpack(fcntl.fcntl(second, fcntl.F_OFD_GETLK,
                                        FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)))
        assert seen == (fcntl.F_WRLCK, os.SEEK_SET, offset, 1, -1)
        with pytest.raises(BlockingIOError):
            fcntl.fcntl(second, fcntl.F_OFD_SETLK,
                        FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        # The byte next to it is free.
        free = FLOCK.unpack(fcntl.fcntl(second, fcntl.F_OFD_GETLK,
                                        FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset + 1, 1, 0)))
        assert free[0] == fcntl.F_UNLCK
        fcntl.fcntl(second, fcntl.F_OFD_SETLK,
                    FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset + 1, 1, 0))
    finally:
        os.close(first)
        os.close(second)


def test_two_host_locks_in_one_process_exclude_each_other(tmp_path):
    """Each HostLocks opens the file itself (an open file description of its own),
    so OFD locks keep them apart even inside one process, job by job."""
    directory = private_dir(tmp_path / "locks")
    first, second = HostLocks(directory, URL), HostLocks(directory, URL)
    try:
        held = first.try_acquire("report")
        assert held is not None
        assert second.try_acquire("report") is None
        assert second.holder("report") == str(os.getpid())    # found through /proc
        other = second.try_acquire("other")
        assert other is not None and first.try_acquire("other") is None
        held.release()
        again = second.try_acquire("report")
        assert again is not None and first.try_acquire("report") is None
        other.release()
        again.release()
        assert first.try_acquire("report") is not None
    finally:
        first.close()
        second.close()
    # Closing drops the locks still held.
    third = HostLocks(directory, URL)
    try:
        assert third.try_acquire("report") is not None
    finally:
        third.close()


def test_distinct_job_names_lock_independently(tmp_path):
    """Long names (over a file name's 255 bytes), unicode, names differing only in
    case or in their last character: each its own lock."""
    directory = private_dir(tmp_path / "locks")
    names = ["a" * 400 + "-one", "a" * 400 + "-two", "a" * 240, "Report", "report",
             "REPORT", "rapport-été", "отчёт", "报告", "report\u0301", "job-1", "job-2"]
    assert len({lock_offset(name) for name in names}) == len(names)
    first, second = HostLocks(directory, URL), HostLocks(directory, URL)
    try:
        for name in names:
            held = first.try_acquire(name)
            assert held is not None, name
            # Only this one is held: every other name is free in the other instance.
            assert second.try_acquire(name) is None, name
            for other in names:
                if other != name:
                    lock = second.try_acquire(other)
                    assert lock is not None, (name, other)
                    lock.release()
            held.release()
    finally:
        first.close()
        second.close()


def test_ten_thousand_jobs_under_ulimit_1024_keep_one_lock_file_open(tmp_path):
    """The loop must not hit EMFILE: whatever the number of jobs, one lock file is
    open, and the locks of long runs stay real."""
    directory = private_dir(tmp_path / "locks")
    out = run_python(f"""
        import os
        from worker.locks import HostLocks
        locks = HostLocks({str(directory)!r}, {URL!r})
        held = [locks.try_acquire(f"held-{{n}}") for n in range(8)]   # long runs
        peak = 0
        for n in range(10_000):
            lock = locks.try_acquire(f"job-{{n}}")
            assert lock is not None, n
            lock.release()
            if n % 500 == 0:
                peak = max(peak, len(os.listdir("/proc/self/fd")))
        # The long runs still hold their locks: nobody else can take them.
        other = HostLocks({str(directory)!r}, {URL!r})
        assert all(other.try_acquire(f"held-{{n}}") is None for n in range(8))
        for lock in held:
            lock.release()
        assert all(other.try_acquire(f"held-{{n}}") is not None for n in range(8))
        print(locks.open_files(), peak)
        """, nofile=1024)
    open_files, peak_fds = map(int, out.split())
    assert open_files == 1
    assert peak_fds < 16
    assert len(list(directory.iterdir())) == 1


def test_many_locks_held_at_once_under_a_tiny_fd_limit_are_all_real(tmp_path):
    """More locks held at once than file descriptors: they are bytes of one file."""
    directory = private_dir(tmp_path / "locks")
    out = run_python(f"""
        from worker.locks import HostLocks
        locks = HostLocks({str(directory)!r}, {URL!r})
        held = [locks.try_acquire(f"job-{{n}}") for n in range(500)]
        assert all(held)
        other = HostLocks({str(directory)!r}, {URL!r})
        assert [other.try_acquire(f"job-{{n}}") for n in range(500)] == [None] * 500
        for lock in held:
            lock.release()
        assert all(other.try_acquire(f"job-{{n}}") for n in range(500))
        print(locks.open_files(), other.open_files())
        """, nofile=32)
    assert out.split() == ["1", "1"]


def test_a_run_costs_only_its_two_fcntl_calls_from_the_first_run_on(tmp_path):
    """Issue 12: a run makes no file-system call besides the fcntl that takes its lock
    and the one that gives it back, even the first run of a job (audit events show
    every open/mkdir/stat/lockf the worker could make; the file's size shows there is
    no write)."""
    directory = private_dir(tmp_path / "locks")
    out = run_python(f"""
        import os, sys
        from worker.locks import HostLocks
        locks = HostLocks({str(directory)!r}, {URL!r})
        events = []
        sys.addaudithook(lambda event, args: events.append(event))
        for n in range(1000):
            locks.try_acquire(f"job-{{n}}").release()        # every job new
        hook_done = len(events)
        sys.stdout.write(" ".join(sorted(set(events[:hook_done]))) + "|"
                         + str(events[:hook_done].count("fcntl.fcntl")) + "|"
                         + str(os.stat(locks.path).st_size))
        """)
    kinds, calls, size = out.split("|")
    assert kinds == "fcntl.fcntl"
    assert calls == "2000"
    assert size == "0"


def test_a_job_locked_in_one_process_is_skipped_by_another(tmp_path, daemons):
    """The no-overlap guarantee between processes, through the real CLI: while this
    process holds the job's lock, a `--once` run of it skips (75) and names our pid."""
    directory = private_dir(tmp_path / "locks")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    config = tmp_path / "jobs.yaml"
    config.write_text(f"""\
database: {{url: "{url}"}}
worker: {{lock_dir: "{directory}"}}
jobs:
  - {{name: report, call: 'tests.jobfuncs:select_one'}}
  - {{name: other, call: 'tests.jobfuncs:select_one'}}
""")
    locks = HostLocks(directory, url)
    try:
        held = locks.try_acquire("report")
        assert held is not None
        blocked = daemons(config, "--once", "--job", "report")
        assert blocked.wait() == 75
        assert f"another run of this job holds its host lock (pid {os.getpid()})" \
            in blocked.log
        free = daemons(config, "--once", "--job", "other")
        assert free.wait() == 0
        held.release()
        after = daemons(config, "--once", "--job", "report")
        assert after.wait() == 0
    finally:
        locks.close()


def test_a_lock_is_not_taken_twice_in_one_process(tmp_path):
    directory = private_dir(tmp_path / "locks")
    locks = HostLocks(directory, URL)
    try:
        first = locks.try_acquire("job")
        assert first is not None and locks.try_acquire("job") is None
        assert locks.holder("job") == str(os.getpid())
        first.release()
        first.release()                                   # idempotent
        assert locks.try_acquire("job") is not None
    finally:
        locks.close()


@pytest.fixture
def holders():
    """Factory: a process that takes some jobs' locks and holds them until the
    test ends (optionally with classic POSIX locks, as without OFD locks)."""
    started: list[subprocess.Popen] = []

    def start(directory: Path, url: str, jobs: list[str], *, classic: bool = False):
        code = f"""
            import sys
            import worker.locks
            if {classic!r}:
                worker.locks.ofd_locks_work = lambda fd: False
            locks = worker.locks.HostLocks({str(directory)!r}, {url!r})
            held = [locks.try_acquire(job) for job in {jobs!r}]
            assert all(held)
            print("holding", flush=True)
            sys.stdin.read()
            """
        process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline() == "holding\n"
        return process

    yield start
    for process in started:
        process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def covering(table, job: str) -> list[int]:
    offset = lock_offset(job)
    return [pid for start, end, pid in table if start <= offset <= end]


def test_the_holders_map_names_the_process_holding_each_job(tmp_path, holders):
    """OFD locks show pid -1 in /proc/locks: the holder is found through
    /proc/<pid>/fdinfo, one scan for every job's lock on the file."""
    directory = private_dir(tmp_path / "locks")
    holder = holders(directory, URL, ["report", "export"])
    locks = HostLocks(directory, URL)
    try:
        info = os.stat(locks.path)
        table = ofd_lock_holders(info.st_dev, info.st_ino, locks.path.name)
        assert covering(table, "report") == covering(table, "export") == [holder.pid]
        assert covering(table, "other") == []
        assert locks.try_acquire("report") is None
        assert locks.holder("report") == locks.holder("export") == str(holder.pid)
        assert locks.holder("other") == "?"
        # Another database's file is another inode: none of these locks are its.
        elsewhere = HostLocks(directory, URL.replace("/app", "/other"))
        try:
            info = os.stat(elsewhere.path)
            assert ofd_lock_holders(info.st_dev, info.st_ino,
                                    elsewhere.path.name) == []
            assert elsewhere.holder("report") == "?"
        finally:
            elsewhere.close()
    finally:
        locks.close()


def test_the_holders_map_is_cached_then_read_again(tmp_path, holders):
    """One /proc scan answers for holder_cache_seconds (a batch whose every job is
    refused does not scan once per job); after that a new holder is found."""
    directory = private_dir(tmp_path / "locks")
    first = holders(directory, URL, ["report"])
    locks = HostLocks(directory, URL)
    try:
        locks.holder_cache_seconds = 3600
        assert locks.try_acquire("report") is None
        assert locks.holder("report") == str(first.pid)
        second = holders(directory, URL, ["export"])
        assert locks.try_acquire("export") is None
        assert locks.holder("export") == "?"          # the cached map predates it
        locks.holder_cache_seconds = 0
        assert locks.holder("export") == str(second.pid)
        assert locks.holder("report") == str(first.pid)
    finally:
        locks.close()


def test_without_ofd_locks_classic_posix_locks_keep_processes_apart(tmp_path, holders,
                                                                    monkeypatch):
    """The fallback where F_OFD_SETLK is missing: per-process record locks, the
    holder's pid straight from F_GETLK."""
    directory = private_dir(tmp_path / "locks")
    holder = holders(directory, URL, ["report"], classic=True)
    monkeypatch.setattr(worker.locks, "ofd_locks_work", lambda fd: False)
    locks = HostLocks(directory, URL)
    try:
        assert locks.try_acquire("report") is None
        assert locks.holder("report") == str(holder.pid)
        other = locks.try_acquire("other")
        assert other is not None and locks.try_acquire("other") is None
        assert locks.holder("other") == str(os.getpid())
        other.release()
        assert locks.try_acquire("other") is not None
    finally:
        locks.close()


def cli(args: list[str], nofile: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        if nofile is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    return subprocess.run([sys.executable, str(ROOT / "run_worker.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)


def batch_config(tmp_path: Path, lock_dir: Path, jobs: int) -> Path:
    lines = [f'database:\n  url: "sqlite:///{tmp_path / "w.db"}"',
             f'worker:\n  max_workers: 4\n  lock_dir: "{lock_dir}"', "jobs:"]
    lines += [f"  - {{name: j{n}, call: 'tests.jobfuncs:noop'}}" for n in range(jobs)]
    path = tmp_path / "jobs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_cli_refuses_a_lock_directory_others_can_write_with_78(tmp_path):
    locks = tmp_path / "locks"
    locks.mkdir()
    locks.chmod(0o777)
    done = cli(["--once", "-c", str(batch_config(tmp_path, locks, 1))])
    assert done.returncode == 78, done.stderr
    assert str(locks) in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_batch_of_ten_thousand_jobs_runs_under_ulimit_1024(tmp_path):
    """The loop claims a batch run (its host lock) only when a worker is free or about
    to be (one queued per worker), so the lock files held open stay bounded whatever
    the number of jobs."""
    config = batch_config(tmp_path, private_dir(tmp_path / "locks"), 10_000)
    done = cli(["--once", "-c", str(config), "--log-level", "WARNING"], nofile=1024)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "10000 job(s): 10000 succeeded, 0 failed" in done.stdout
    (lock_file,) = (tmp_path / "locks").iterdir()       # one file for every job
    assert lock_file.suffix == ".locks" and lock_file.stat().st_size == 0
