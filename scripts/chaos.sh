#!/usr/bin/env bash
# The chaos run (tests/chaos, docs/architecture.md#the-chaos-run) on every backend,
# about 60 s each: SQLite with one daemon, MariaDB, PostgreSQL and SQL Server (the
# TDS test server) with two nodes in cluster mode. Exit 1 if any run found a violation.
# scripts/test.sh runs it after pytest; it needs what scripts/test.sh sets up.
#
#   CHAOS_SECONDS   seconds per backend (default 60)
#   CHAOS_SEED      the seed (default: the commit's short hash as a number, so each
#                   change draws new events and a red run can be repeated from it)
#   CHAOS_EXCLUDE   event kinds never drawn (comma-separated); default: none
#   CHAOS_BACKENDS  default "sqlite:1 mariadb:2 postgresql:2 sqlserver:2"
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${CHAOS_SECONDS:-60}
seed=${CHAOS_SEED:-$(( 16#$(git rev-parse --short=7 HEAD 2>/dev/null || echo 1) ))}
# Every event kind is drawn: the defects that once needed exclusions (issue 19:
# stuck threads, timezone reloads, cluster --once without its run table, signals
# during logging) are fixed. CHAOS_EXCLUDE=kind,... leaves kinds out by hand.
exclude=${CHAOS_EXCLUDE-}
status=0
for setup in ${CHAOS_BACKENDS:-sqlite:1 mariadb:2 postgresql:2 sqlserver:2}; do
    backend=${setup%%:*}
    nodes=${setup##*:}
    echo "== chaos: --backend $backend --nodes $nodes --seconds $seconds --seed $seed" \
         "${exclude:+--exclude $exclude}"
    .venv/bin/python -m tests.chaos --backend "$backend" --nodes "$nodes" \
        --seconds "$seconds" --seed "$seed" ${exclude:+--exclude "$exclude"} || status=1
done
exit $status
