"""A TDS 7.4 test server over SQLite, so that the tests talk to SQL Server drivers for real.

Modules: tds (packets, tokens, values), login (PRELOGIN, LOGIN7), translate (T-SQL to
SQLite through sqlglot), types (SQL Server types of result columns), faults (the
YAML fault book), session (one connection's requests), storage (the one SQLite
connection under the server's own transactions, undo log and read/write locking), locks
(the lock manager and its deadlock monitor), catalog (the sys views SQLAlchemy's
inspector joins), server (sockets, threads, counters). Run it with `python -m tests.sqlserver --port PORT --database FILE`.
"""
