"""Host locks (issue 10 item 9, issue 12's lock cost): a lock directory another user
could write to is refused, no link is followed, no credential reaches a file name,
the open lock files stay bounded whatever the number of jobs, and a run costs the
flock calls only; two processes still never run one job at once."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT
from worker.locks import HostLocks, LockDirectoryError, NAME_MAX

URL = "mysql+pyodbc://worker:s3cret@db.example/app?driver=MariaDB+Unicode"
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


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


def test_a_link_planted_in_the_lock_directory_is_never_followed(tmp_path):
    directory = private_dir(tmp_path / "locks")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    locks = HostLocks(directory, URL)
    try:
        locks.path_for("job").symlink_to(victim)
        with pytest.raises(OSError, match="symbolic link"):
            locks.try_acquire("job")
    finally:
        locks.close()
    assert victim.read_text() == "precious\n"


def test_a_new_lock_directory_is_private(tmp_path):
    directory = tmp_path / "new" / "locks"
    HostLocks(directory, URL).close()
    assert (directory.stat().st_mode & 0o777) == 0o700


def test_the_lock_file_name_does_not_depend_on_credentials(tmp_path):
    directory = private_dir(tmp_path / "locks")

    def name(url: str, job: str = "job") -> str:
        locks = HostLocks(directory, url)
        try:
            return locks.path_for(job).name
        finally:
            locks.close()

    base = name(URL)
    assert name(URL.replace("s3cret", "other")) == base
    assert name(URL.replace("worker:s3cret@", "worker@")) == base
    assert name(URL + "&PWD=a1") == name(URL + "&PWD=b2") == base
    assert name(URL + "&api_token=a1") == base
    odbc = "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BX%7D%3BSERVER%3Dh%3BPWD%3D%7Ba%3Bb%7D"
    assert name(odbc) == name(odbc.replace("PWD%3D%7Ba%3Bb%7D", "PWD%3Dz"))
    # Another database (or user) is another lock.
    assert name(URL.replace("/app", "/other")) != base
    assert name(URL.replace("worker:", "admin:")) != base
    assert name(URL, "job2") != base


def test_a_long_job_name_gets_a_file_name_that_fits(tmp_path):
    directory = private_dir(tmp_path / "locks")
    long_a, long_b = "a" * 400 + "-one", "a" * 400 + "-two"
    locks = HostLocks(directory, URL)
    try:
        held = [locks.try_acquire(name) for name in (long_a, long_b, "a" * 240)]
        assert all(held)
        names = sorted(path.name for path in directory.iterdir())
        assert len(names) == 3 and all(len(n.encode()) <= NAME_MAX for n in names)
        for lock in held:
            lock.release()
    finally:
        locks.close()


def test_ten_thousand_jobs_under_ulimit_1024_stay_within_the_fd_bound(tmp_path):
    """The loop must not hit EMFILE: the lock files kept open are capped at
    min(256, soft limit / 4), and a locked file is never the one closed."""
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
        print(locks.max_open, locks.open_files(), peak)
        """, nofile=1024)
    max_open, open_files, peak_fds = map(int, out.split())
    assert max_open == 256 and open_files <= 256
    assert peak_fds < 1024 // 2
    assert len(list(directory.iterdir())) == 10_008


def test_more_locks_held_at_once_than_the_budget_are_all_real(tmp_path):
    """Locked files are never closed to make room (that would drop their lock), nor is
    the one being locked; the budget is exceeded only by locks actually held."""
    directory = private_dir(tmp_path / "locks")
    out = run_python(f"""
        from worker.locks import HostLocks
        locks = HostLocks({str(directory)!r}, {URL!r})
        held = [locks.try_acquire(f"job-{{n}}") for n in range(12)]
        assert all(held)
        other = HostLocks({str(directory)!r}, {URL!r})
        assert [other.try_acquire(f"job-{{n}}") for n in range(12)] == [None] * 12
        for lock in held:
            lock.release()
        locks.try_acquire("one-more").release()
        print(locks.max_open, locks.open_files())
        """, nofile=32)
    assert out.split() == ["8", "8"]


def test_a_cached_lock_costs_only_its_flock_calls(tmp_path):
    """Issue 12: after a job's first run, a run makes no file-system call besides
    flock (audit events show every open/mkdir/stat the worker could make, and the
    file's content shows there is no write)."""
    directory = private_dir(tmp_path / "locks")
    out = run_python(f"""
        import sys
        from worker.locks import HostLocks
        locks = HostLocks({str(directory)!r}, {URL!r})
        locks.try_acquire("job").release()                 # first run: opens the file
        path = locks.path_for("job")
        path.write_text("marker")
        events = []
        sys.addaudithook(lambda event, args: events.append(event))
        for _ in range(1000):
            locks.try_acquire("job").release()
        sys.stdout.write(" ".join(sorted(set(events))) + "|" + str(events.count(
            "fcntl.flock")) + "|" + open(path).read())
        """)
    kinds, flocks, content = out.split("|")
    assert kinds == "fcntl.flock"
    assert flocks == "2000"
    assert content == "marker"          # no per-run write of the holder's pid


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
