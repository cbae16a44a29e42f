# db-job-worker: the worker, Python 3.11 and one ODBC driver for SQL Server.
#
#   docker build -t db-worker .                                        # Microsoft ODBC Driver 18 (apt)
#   docker build -t db-worker --build-arg ODBC_DRIVER=freetds .        # FreeTDS instead
#   docker build -t db-worker --build-arg ODBC_DRIVER=msodbcsql18-pypi .  # Microsoft's driver from PyPI
#   docker run --rm db-worker                                          # the example batch, once
#
# The Debian release is pinned (bookworm = Debian 12): the plain python:3.11-slim
# tag now follows newer Debian releases, while Microsoft's apt repository below is
# per release. BASE_IMAGE is for builders that cannot pull it (CI builds on a local
# Debian bookworm with Debian's python3.11; see docs/docker.md); it must be a
# Debian bookworm with Python 3.11 and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# msodbcsql18:      "ODBC Driver 18 for SQL Server" from Microsoft's apt repository
#                   (the supported route; you accept Microsoft's EULA by building).
# msodbcsql18-pypi: the same driver's files from PyPI (mssql-python-odbc, packaged by
#                   Microsoft for mssql-python), for builders that cannot reach
#                   Microsoft's repository; registered under the same name.
# freetds:          FreeTDS (Debian's tdsodbc), registered as the ODBC driver "FreeTDS".
#
# For msodbcsql18-pypi the step installs what the msodbcsql18 package depends on
# (Kerberos, linked; OpenSSL, loaded for TLS), puts the driver and its messages
# where that package puts them, and leaves out the wheel's own libodbcinst.so.2 so
# that the driver uses the system's unixODBC, as with the apt package. The build
# fails if a library the driver links is missing.
ARG ODBC_DRIVER=msodbcsql18
ARG MSSQL_PYTHON_ODBC_VERSION=18.6.2.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_CACHE_DIR=1

# The worker's own Python environment: it keeps the image's system Python (which
# Debian marks externally managed) untouched, and the driver step below uses its pip.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends unixodbc odbcinst ca-certificates; \
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
      msodbcsql18-pypi) \
        apt-get install -y --no-install-recommends libgssapi-krb5-2 libkrb5-3 libssl3 libstdc++6; \
        pip download --no-deps --only-binary=:all: --dest /tmp/msodbc \
            "mssql-python-odbc==${MSSQL_PYTHON_ODBC_VERSION}"; \
        mkdir /tmp/msodbc/x; \
        python3 -m zipfile -e /tmp/msodbc/mssql_python_odbc-*.whl /tmp/msodbc/x; \
        src="$(echo /tmp/msodbc/x/mssql_python_odbc/libs/linux/debian_ubuntu/*)"; \
        lib="$(find "$src/lib" -name 'libmsodbcsql-18.*.so.*' -print)"; \
        test "$(echo "$lib" | wc -w)" -eq 1; \
        dest=/opt/microsoft/msodbcsql18; \
        install -d "$dest/lib64" "$dest/share/resources/en_US"; \
        install -m 0644 "$lib" "$src/lib/MICROSOFT_ODBC_DRIVER_FOR_SQL_SERVER_LICENSE.txt" "$dest/lib64/"; \
        install -m 0644 "$src"/share/resources/en_US/* "$dest/share/resources/en_US/"; \
        printf '[ODBC Driver 18 for SQL Server]\nDescription = Microsoft ODBC Driver 18 for SQL Server (from PyPI: mssql-python-odbc %s)\nDriver = %s\nUsageCount = 1\n' \
          "$MSSQL_PYTHON_ODBC_VERSION" "$dest/lib64/$(basename "$lib")" > /tmp/msodbc/odbcinst.ini; \
        odbcinst -i -d -f /tmp/msodbc/odbcinst.ini; \
        rm -rf /tmp/msodbc; \
        if ldd "$dest/lib64/$(basename "$lib")" | grep 'not found'; then exit 1; fi; \
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
        echo "ODBC_DRIVER must be msodbcsql18, msodbcsql18-pypi or freetds, not '$ODBC_DRIVER'" >&2; \
        exit 1; \
        ;; \
    esac; \
    odbcinst -q -d; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*

# An unprivileged user, and a directory it may write to (the example job list's
# SQLite file goes there; see WORKER_DATABASE_URL below). Its uid is fixed (10001)
# so that Kubernetes' runAsNonRoot can check it (deploy/kubernetes/).
RUN set -eux; \
    groupadd --system --gid 10001 worker; \
    useradd --system --uid 10001 --gid worker --create-home --home-dir /home/worker \
        --shell /usr/sbin/nologin worker; \
    mkdir -p /data; \
    chown worker:worker /data

WORKDIR /app
# The dependencies first, in their own layer, so that a change to the source
# does not download them again; they are read from setup.cfg, the one list: the
# core and the `metrics` extra (prometheus-client: /metrics, the health endpoints
# and the status page of a `metrics:` section).
COPY setup.cfg /app/
RUN set -eux; \
    python3 -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(c["options"]["install_requires"]); print(c["options.extras_require"]["metrics"])' \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt "setuptools>=64" wheel; \
    rm /tmp/requirements.txt
COPY . /app
RUN set -eux; \
    pip install --no-deps --no-build-isolation .; \
    rm -rf build *.egg-info

# config/jobs.yaml reads its URL from ${WORKER_DATABASE_URL:-sqlite:///worker.db};
# /app is not writable for the worker user, so point the example at /data.
ENV WORKER_DATABASE_URL=sqlite:////data/worker.db

USER worker
STOPSIGNAL SIGTERM
# The monitoring listener's default port (a `metrics:` section; address 0.0.0.0 to
# be reached from outside the container).
EXPOSE 9464
# /healthz of that listener, with the image's Python (no curl here). Only the docker
# image format keeps a HEALTHCHECK (buildah and podman build OCI by default: use
# --format docker). A container without a listener (a `--once` batch, a config
# without `metrics:`) should be run with --no-healthcheck, or with
# WORKER_HEALTHCHECK_URL set empty, which turns the check into a no-op.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; url = os.environ.get('WORKER_HEALTHCHECK_URL', 'http://127.0.0.1:9464/healthz'); sys.exit(0 if not url or urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]
# Job modules are imported relative to the working directory (/app), and the
# default job list is /app/config/jobs.yaml (override with -c or WORKER_CONFIG).
ENTRYPOINT ["run-worker"]
# One batch, then exit. Arguments after the image name replace this: e.g.
# `--check --connect`, or `--log-format json` (no mode flag) for the daemon, which
# stops cleanly on SIGTERM within worker.shutdown_timeout (use --stop-timeout 45).
CMD ["--once"]
