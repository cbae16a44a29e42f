"""A TDS 7.4 test server over SQLite, so that the tests talk to SQL Server drivers for real.

Modules: tds (packets, tokens, values), login (PRELOGIN, LOGIN7), translate (a batch's
statements and control flow; each statement to SQLite through sqlglot), batch (running
a batch as SQL Server: errors, transactions, TRY/CATCH, variables), functions (SQL
Server's arithmetic, conversions and session functions in SQLite), catalog (the views
SQLAlchemy's inspector reads), types (SQL Server types of result columns), faults (the
YAML fault book), session (one connection's requests), storage (the one SQLite
connection under the server's own transactions, undo log and read/write locking), locks
(the lock manager and its deadlock monitor), server (sockets, threads, counters). Run it
with `python -m tests.sqlserver --port PORT --database FILE`.
"""
