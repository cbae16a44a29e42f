"""A raw pyodbc connection on the side that reads MariaDB's own view of things:
global status counters, and the connections a process has open."""
from __future__ import annotations

import pyodbc

from .backends import MARIADB_ODBC

# What moves which counter, checked against MariaDB 10.11 with Connector/ODBC 3.1
# (the "probes" of the round-trips section re-check it on every run):
# - a statement (COM_QUERY, or COM_STMT_EXECUTE: the ODBC driver prepares even
#   plain statements) adds 1 to Questions and 1 to its Com_<kind>;
# - commit()/rollback() (SQLEndTran) send COMMIT/ROLLBACK as text: Com_commit or
#   Com_rollback, and 1 Question each; ROLLBACK is sent even with no open transaction;
# - COM_PING adds 1 to Com_admin_commands and nothing to Questions;
# - COM_STMT_PREPARE / COM_STMT_CLOSE have their own counters and are not
#   Questions. They cost no round trip of their own: the driver sends PREPARE and
#   EXECUTE in one write and reads one reply, and CLOSE has no reply (seen with
#   strace: per `SELECT 1` + commit, 3 writes and 2 reads). So the client's round
#   trips are Questions + COM_PINGs.


STATUS_SQL = "SHOW STATUS"   # the session's own counters (SHOW GLOBAL STATUS: everyone's)


def status_counters(rows) -> dict[str, int]:
    """SHOW [GLOBAL|SESSION] STATUS rows -> the Com_* counters, Questions, Queries."""
    return {name: int(value) for name, value in rows
            if (name.startswith("Com_") or name in ("Questions", "Queries"))
            and value is not None and value.isdigit()}


def diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after
            if after[name] != before.get(name, 0)}


class ServerMonitor:
    def __init__(self) -> None:
        self.connection = pyodbc.connect(MARIADB_ODBC, autocommit=True)
        self.connection_id = self.scalar("SELECT CONNECTION_ID()")
        self._own_cost = self._measure_own_cost()

    def scalar(self, sql: str, *params):
        return self.connection.cursor().execute(sql, *params).fetchone()[0]

    def counters(self) -> dict[str, int]:
        """The server's global counters (every client's work, this reading's too)."""
        return status_counters(
            self.connection.cursor().execute("SHOW GLOBAL STATUS").fetchall())

    def _measure_own_cost(self, readings: int = 5) -> dict[str, int]:
        """What one reading adds to the global counters: the smallest difference
        between back-to-back readings (other clients can only add to it)."""
        costs = [diff(self.counters(), self.counters()) for _ in range(readings)]
        names = set().union(*costs)
        return {name: min(cost.get(name, 0) for cost in costs) for name in names}

    def moved(self, before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """Global counters that moved between two readings, this monitor's share removed."""
        moved = diff(before, after)
        for name, own in self._own_cost.items():
            moved[name] = moved.get(name, 0) - own
        return {name: value for name, value in moved.items() if value}

    def client_ids(self, user: str) -> set[int]:
        """Server ids of this user's connections to the benchmark's database, the
        monitor's own excluded (others running tests on the same server as the same
        user, on databases of their own, are not counted)."""
        rows = self.connection.cursor().execute(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ? AND ID <> ? "
            "AND DB <=> DATABASE()", user, self.connection_id).fetchall()
        return {int(row[0]) for row in rows}

    def variable(self, name: str) -> int:
        return int(self.scalar(f"SELECT @@{name}"))

    def close(self) -> None:
        self.connection.close()

