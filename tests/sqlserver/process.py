"""The test server as a process, for tests: started on a free port, its faults file
rewritten by the test, its counters read through a real driver."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MS_DRIVER = "ODBC Driver 18 for SQL Server"
DRIVERS = ("msodbc", "freetds", "mssqlpython")
USER, PASSWORD = "sa", "test"     # the server takes any user with this password
# The program name of the tests' own connections (counters, set-up, admin), so that
# sys.dm_exec_sessions can tell them from the worker's.
HARNESS_APP = "tds test harness"


class TdsServerProcess:
    def __init__(self, directory: Path, name: str = "tds") -> None:
        self.directory = directory
        self.database = directory / f"{name}.db"
        self.faults_path = directory / f"{name}-faults.yaml"
        self.faults_path.write_text("[]\n")
        self.log_path = directory / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.sqlserver", "--port", "0", "--database",
             str(self.database), "--faults", str(self.faults_path), "--verbose"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("listening on 127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"test server did not start: {line!r}\n{self.log}")
        self.port = int(line.rsplit(":", 1)[1])
        self._stats_connection = None

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def url(self, driver: str = "msodbc", password: str = PASSWORD, database: str = "test",
            odbc_driver: str | None = None) -> str:
        """A SQLAlchemy URL for one of the three drivers."""
        base = f"{USER}:{password}@127.0.0.1:{self.port}/{database}"
        if driver == "msodbc":
            name = (odbc_driver or MS_DRIVER).replace(" ", "+")
            return f"mssql+pyodbc://{base}?driver={name}&Encrypt=no"
        if driver == "freetds":
            return f"mssql+pyodbc://{base}?driver=FreeTDS&TDS_Version=7.4"
        if driver == "mssqlpython":
            return f"mssql+mssqlpython://{base}?Encrypt=no"
        raise ValueError(driver)

    def odbc(self, autocommit: bool = True):
        """A raw pyodbc connection through Microsoft's driver, for the test's own use."""
        import pyodbc
        return pyodbc.connect(f"DRIVER={{{MS_DRIVER}}};SERVER=127.0.0.1,{self.port};"
                              f"DATABASE=test;UID={USER};PWD={PASSWORD};Encrypt=no;APP={HARNESS_APP}",
                              autocommit=autocommit, timeout=10)

    def freetds(self, autocommit: bool = True):
        """A raw pyodbc connection through FreeTDS."""
        import pyodbc
        return pyodbc.connect(f"DRIVER={{FreeTDS}};SERVER=127.0.0.1;PORT={self.port};"
                              f"DATABASE=test;UID={USER};PWD={PASSWORD};TDS_Version=7.4",
                              autocommit=autocommit, timeout=10)

    def set_faults(self, text: str) -> None:
        """Replace the faults; the server sees the change at its next statement."""
        before = self.faults_path.stat().st_mtime_ns
        self.faults_path.write_text(text)
        stamp = max(time.time_ns(), before + 1_000_000)
        os.utime(self.faults_path, ns=(stamp, stamp))

    def stats(self) -> dict[str, int]:
        """The server's counters, read on a connection kept open for it (so reading
        them adds no login and no request to what they count)."""
        if self._stats_connection is None:
            self._stats_connection = self.odbc()
        cursor = self._stats_connection.execute("SELECT * FROM tds_stats")
        names = [d[0] for d in cursor.description]
        return dict(zip(names, cursor.fetchone()))

    def execute(self, sql: str, *params):
        connection = self.odbc()
        try:
            cursor = connection.execute(sql, *params)
            return cursor.fetchall() if cursor.description else None
        finally:
            connection.close()

    def stop(self) -> int:
        if self._stats_connection is not None:
            self._stats_connection.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
