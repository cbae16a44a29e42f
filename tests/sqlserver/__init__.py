"""A TDS 7.4 test server over SQLite, so that the tests talk to SQL Server drivers for real.

Modules: tds (packets, tokens, values), login (PRELOGIN, LOGIN7), translate (a batch's
statements and control flow; each statement to SQLite through sqlglot), batch (running
a batch as SQL Server: errors, transactions, TRY/CATCH, variables), functions (SQL
Server's arithmetic, conversions and session functions in SQLite), catalog (the views
SQLAlchemy's inspector reads), types (SQL Server types of result columns), faults (the
YAML fault book), session (one connection's requests), server (sockets, threads,
counters). Run it with `python -m tests.sqlserver --port PORT --database FILE`.
"""
