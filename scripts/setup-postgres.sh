#!/usr/bin/env bash
# PostgreSQL for the tests (called by scripts/test.sh):
# - Debian's `postgresql` installed when missing, the cluster started when it does
#   not answer on 127.0.0.1:5432;
# - a role and database `worker_test` (password `worker_test`) of the tests' own,
#   allowed to set log_statement (the statements-per-job scenario reads the server
#   log) and deadlock_timeout (the deadlock storm would wait 1 s per deadlock);
# - the project's `postgresql` extra (psycopg 3) in .venv.
# With TEST_POSTGRES_URL set the tests use that server instead: nothing is installed
# or created here.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,postgresql]'

if [ -n "${TEST_POSTGRES_URL:-}" ]; then
    echo "setup-postgres.sh: TEST_POSTGRES_URL is set; using that server as it is"
    exit 0
fi

if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "ok installed"; then
    echo "setup-postgres.sh: installing postgresql"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "setup-postgres.sh: starting PostgreSQL"
    version=$(ls /etc/postgresql | sort -V | tail -1)
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 0.5
    done
    pg_isready -q -h 127.0.0.1 -p 5432
fi

# As the postgres superuser over the local socket (peer authentication on a fresh
# Debian install). The password is the test role's own, like MariaDB's.
if [ "$(id -u)" -eq 0 ]; then AS_POSTGRES=(runuser -u postgres --); else AS_POSTGRES=(sudo -u postgres); fi
"${AS_POSTGRES[@]}" psql -q -v ON_ERROR_STOP=1 -d postgres <<'SQL'
SELECT 'CREATE ROLE worker_test LOGIN PASSWORD ''worker_test'''
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'worker_test') \gexec
-- worker_test_gw0/1: one for each pytest-xdist worker (tests/conftest.py).
SELECT format('CREATE DATABASE %I OWNER worker_test', name)
FROM unnest(ARRAY['worker_test', 'worker_test_gw0', 'worker_test_gw1']) AS name
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = name) \gexec
-- GRANT SET ON PARAMETER exists from PostgreSQL 15 on; on older servers those two
-- scenarios say they cannot run.
SELECT 'GRANT SET ON PARAMETER log_statement, deadlock_timeout TO worker_test'
WHERE current_setting('server_version_num')::int >= 150000 \gexec
SQL
