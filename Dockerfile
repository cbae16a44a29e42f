# db-job-worker: the worker, Python 3.11 and one ODBC driver for SQL Server.
#
#   docker build -t db-worker .                                   # Microsoft ODBC Driver 18
#   docker build -t db-worker --build-arg ODBC_DRIVER=freetds .   # FreeTDS instead
#   docker run --rm db-worker                                     # the example batch, once
#
# The Debian release is pinned (bookworm = Debian 12): the plain python:3.11-slim
# tag now follows newer Debian releases, while Microsoft's apt repository below is
# per release.
FROM python:3.11-slim-bookworm

# msodbcsql18: "ODBC Driver 18 for SQL Server" (you accept Microsoft's EULA by building).
# freetds:     FreeTDS (Debian's tdsodbc), registered as the ODBC driver "FreeTDS".
ARG ODBC_DRIVER=msodbcsql18

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends unixodbc ca-certificates; \
    case "$ODBC_DRIVER" in \
      msodbcsql18) \
        apt-get install -y --no-install-recommends curl gnupg; \
        curl -fsSL -o /tmp/microsoft.asc https://packages.microsoft.com/keys/microsoft.asc; \
        gpg --dearmor -o /usr/share/keyrings/microsoft-prod.gpg /tmp/microsoft.asc; \
        rm /tmp/microsoft.asc; \
        echo "deb [arch=$(dpkg --print-architecture) signed-by=/usr/share/keyrings/microsoft-prod.gpg] https://packages.microsoft.com/debian/12/prod bookworm main" \
          > /etc/apt/sources.list.d/mssql-release.list; \
        apt-get update; \
        ACCEPT_EULA=Y apt-get install -y --no-install-recommends msodbcsql18; \
        apt-get purge -y --auto-remove curl gnupg; \
        ;; \
      freetds) \
        apt-get install -y --no-install-recommends tdsodbc; \
        lib="$(find /usr/lib -name libtdsodbc.so -print -quit)"; \
        test -n "$lib"; \
        printf '[FreeTDS]\nDescription = FreeTDS ODBC driver (SQL Server, Sybase)\nDriver = %s\n' "$lib" \
          > /tmp/freetds-odbcinst.ini; \
        odbcinst -i -d -f /tmp/freetds-odbcinst.ini; \
        rm /tmp/freetds-odbcinst.ini; \
        ;; \
      *) \
        echo "ODBC_DRIVER must be msodbcsql18 or freetds, not '$ODBC_DRIVER'" >&2; \
        exit 1; \
        ;; \
    esac; \
    odbcinst -q -d; \
    rm -rf /var/lib/apt/lists/*

# An unprivileged user, and a directory it may write to (the example job list's
# SQLite file goes there; see WORKER_DATABASE_URL below).
RUN set -eux; \
    groupadd --system worker; \
    useradd --system --gid worker --create-home --home-dir /home/worker \
        --shell /usr/sbin/nologin worker; \
    mkdir -p /data; \
    chown worker:worker /data

WORKDIR /app
COPY . /app
RUN set -eux; \
    pip install --no-cache-dir .; \
    rm -rf build *.egg-info

# config/jobs.yaml reads its URL from ${WORKER_DATABASE_URL:-sqlite:///worker.db};
# /app is not writable for the worker user, so point the example at /data.
ENV WORKER_DATABASE_URL=sqlite:////data/worker.db

USER worker
STOPSIGNAL SIGTERM
# Job modules are imported relative to the working directory (/app), and the
# default job list is /app/config/jobs.yaml (override with -c or WORKER_CONFIG).
ENTRYPOINT ["run-worker"]
# One batch, then exit. Arguments after the image name replace this: e.g.
# `--check --connect`, or `--log-format json` (no mode flag) for the daemon, which
# stops cleanly on SIGTERM within worker.shutdown_timeout (use --stop-timeout 45).
CMD ["--once"]
