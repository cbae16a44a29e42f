"""A TDS 7.4 test server over SQLite, so that the tests talk to SQL Server drivers for real.

Modules: tds (packets, tokens, values), login (PRELOGIN, LOGIN7), translate (T-SQL to
SQLite through sqlglot), types (SQL Server types of result columns), faults (the
YAML fault book), session (one connection's requests), server (sockets, threads,
counters). Run it with `python -m tests.sqlserver --port PORT --database FILE`.
"""
