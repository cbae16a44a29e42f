#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine that has Python and
# apt, then run them:  bash scripts/test.sh  [extra pytest arguments]
#
# - Debian packages: unixODBC, MariaDB Connector/ODBC ("MariaDB Unicode"),
#   FreeTDS (tdsodbc), and a MariaDB server when none is installed;
# - MariaDB started if it is not answering, and a test user and database;
# - a virtual environment in .venv with the project and its test extra;
# - pytest, against SQLite and against MariaDB through pyodbc;
# - the chaos run, about 60 s per backend (scripts/chaos.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for pkg in unixodbc unixodbc-dev odbc-mariadb tdsodbc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ! -x /usr/sbin/mariadbd ]; then missing+=(mariadb-server mariadb-client); fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# MariaDB must answer on 127.0.0.1:3306.
if ! mariadb-admin --protocol=socket -uroot ping >/dev/null 2>&1; then
    echo "test.sh: starting MariaDB"
    $SUDO mkdir -p /run/mysqld
    $SUDO chown mysql:mysql /run/mysqld 2>/dev/null || true
    $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    for _ in $(seq 1 60); do
        mariadb-admin --protocol=socket -uroot ping >/dev/null 2>&1 && break
        sleep 0.5
    done
    mariadb-admin --protocol=socket -uroot ping >/dev/null
fi
# A user and database of the tests' own, so they do not depend on how root may log in.
$SUDO mariadb --protocol=socket -uroot <<'SQL'
CREATE DATABASE IF NOT EXISTS worker_test;
-- One database for each pytest-xdist worker (tests/conftest.py).
CREATE DATABASE IF NOT EXISTS worker_test_gw0;
CREATE DATABASE IF NOT EXISTS worker_test_gw1;
CREATE USER IF NOT EXISTS 'worker_test'@'localhost' IDENTIFIED BY 'worker_test';
CREATE USER IF NOT EXISTS 'worker_test'@'127.0.0.1' IDENTIFIED BY 'worker_test';
CREATE USER IF NOT EXISTS 'worker_test'@'%' IDENTIFIED BY 'worker_test';
GRANT ALL ON worker_test.* TO 'worker_test'@'localhost';
GRANT ALL ON worker_test_gw0.* TO 'worker_test'@'localhost';
GRANT ALL ON worker_test_gw1.* TO 'worker_test'@'localhost';
GRANT ALL ON worker_test.* TO 'worker_test'@'127.0.0.1';
GRANT ALL ON worker_test_gw0.* TO 'worker_test'@'127.0.0.1';
GRANT ALL ON worker_test_gw1.* TO 'worker_test'@'127.0.0.1';
GRANT ALL ON worker_test.* TO 'worker_test'@'%';
GRANT ALL ON worker_test_gw0.* TO 'worker_test'@'%';
GRANT ALL ON worker_test_gw1.* TO 'worker_test'@'%';
-- PROCESS lets the fault tests see and KILL the worker's own connections.
GRANT PROCESS ON *.* TO 'worker_test'@'localhost', 'worker_test'@'127.0.0.1', 'worker_test'@'%';
SQL

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,metrics]'
# What the other suites need: PostgreSQL and psycopg, systemd-analyze for the unit
# files, and the SQL Server drivers (mssql-python, Microsoft's ODBC driver registered).
bash scripts/setup-postgres.sh
bash scripts/setup-deploy-tests.sh
bash scripts/setup-sqlserver.sh
bash scripts/setup-monitoring-tests.sh
bash scripts/test-container.sh  # the Dockerfile built with buildah and its images run (docs/docker.md)

status=0
# Two worker processes (pytest-xdist), each on databases of its own (tests/conftest.py);
# PYTEST_WORKERS=0 runs the suite in this one process.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@" || status=$?
# The chaos run, about 60 s per backend (scripts/chaos.sh), when the whole suite
# runs (no pytest arguments) or CHAOS=1; CHAOS=0 leaves it out.
if [ "${CHAOS:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
    bash scripts/chaos.sh || status=1
fi
exit $status
