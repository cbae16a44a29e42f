#!/usr/bin/env bash
# SQL Server drivers for the tests, called by scripts/test.sh after .venv exists:
# - the `mssql` extra (mssql-python, whose dependency mssql-python-odbc carries
#   Microsoft's ODBC Driver 18 for Linux) installed into .venv;
# - that driver registered with unixODBC as "ODBC Driver 18 for SQL Server",
#   pointing at the file in THIS checkout's .venv. Re-registered on every run, so a
#   registration left by another checkout (or a removed venv) is never used.
# FreeTDS ("FreeTDS", tdsodbc) is installed by test.sh with the other Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,mssql]'

driver_file=$(.venv/bin/python - <<'PY'
import pathlib, mssql_python_odbc
root = pathlib.Path(mssql_python_odbc.__file__).parent
found = sorted(root.glob("libs/linux/debian_ubuntu/x86_64/lib/libmsodbcsql-18*.so*"))
print(found[0] if found else "")
PY
)
if [ -z "$driver_file" ]; then
    echo "setup-sqlserver.sh: Microsoft's ODBC driver not found in mssql-python-odbc" >&2
    exit 1
fi
name="ODBC Driver 18 for SQL Server"
template=$(mktemp)
trap 'rm -f "$template"' EXIT
printf '[%s]\nDescription=Microsoft ODBC Driver 18 for SQL Server (from mssql-python-odbc)\nDriver=%s\nUsageCount=1\n' \
    "$name" "$driver_file" > "$template"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
# Remove every earlier registration (odbcinst counts usages), then register this one.
while odbcinst -q -d -n "$name" >/dev/null 2>&1; do
    $SUDO odbcinst -u -d -n "$name" >/dev/null 2>&1 || break
done
$SUDO odbcinst -i -d -f "$template" >/dev/null
echo "setup-sqlserver.sh: \"$name\" -> $driver_file"
