#!/usr/bin/env bash
# Build the repository's Dockerfile with buildah (no Docker engine needed) and prove
# the images work: bash scripts/test-container.sh  (scripts/test.sh calls it).
#
# - installs buildah and debootstrap when missing (Debian packages);
# - builds a local base image, Debian bookworm (debootstrap) with Debian's
#   python3.11 and venv, because registries of container images may be out of reach;
#   it stands in for python:3.11-slim-bookworm through the Dockerfile's BASE_IMAGE;
# - builds the image twice (buildah bud --isolation chroot --layers): with
#   Microsoft's ODBC Driver 18 from PyPI (ODBC_DRIVER=msodbcsql18-pypi) and with
#   FreeTDS (ODBC_DRIVER=freetds);
# - in each image: the default command (the example batch on SQLite), --check
#   --connect through the image's SQL Server driver, the daemon stopped by SIGTERM,
#   the user, and what the image must not hold;
# - prints build times and image sizes; exits non-zero on the first failed check.
#
# Everything it keeps between runs is under $DB_JOB_WORKER_CACHE (default
# /var/cache/db-job-worker): buildah's storage for these builds (the base image,
# the layer cache, the images) and the last build logs. Delete it to start cold.
#
# apt and pip inside the builds use this machine's package sources, read at run
# time (nothing here names a registry): the base gets the host's apt sources, its
# Acquire settings, its extra CA certificates, and the host's pip index settings
# (pip's configuration files and PIP_* variables, as pip resolves them) as
# /etc/pip.conf. Local directories (file: indexes) are left out. The base is a test
# stand-in, so the test images carry these too; the Dockerfile adds nothing of it.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"  # debootstrap, chroot

if [ "$(id -u)" -ne 0 ]; then
    # buildah's chroot isolation and debootstrap need root.
    exec sudo --preserve-env bash "$0" "$@"
fi

CACHE_DIR="${DB_JOB_WORKER_CACHE:-/var/cache/db-job-worker}"
STORE="$CACHE_DIR/containers"
RUNROOT=/run/db-job-worker-containers
LOGS="$CACHE_DIR/logs"
IMAGE=localhost/db-job-worker-test
DRIVERS=(msodbcsql18-pypi freetds)
BASE_PACKAGES="python3.11,python3-venv,python3-distutils,ca-certificates"

say() { echo "test-container: $*"; }
fail() { echo "test-container: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
bh() { buildah --root "$STORE" --runroot "$RUNROOT" "$@"; }

started_all=$(now)
mkdir -p "$CACHE_DIR" "$LOGS"
# One run at a time on this machine: the runs share the cache and the image names.
exec 9>"$CACHE_DIR/lock"
flock -w 900 9 || fail "another run holds $CACHE_DIR/lock"

WORK="$(mktemp -d /tmp/test-container.XXXXXX)"
CONTAINERS=()
SERVER_PIDS=()
DAEMON_PIDS=()
cleanup() {
    local c p
    for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    # A daemon left by a failed check: its PID 1 first (unshare's --kill-child does
    # not reach it once chroot has changed its user), which ends its namespace.
    for p in "${DAEMON_PIDS[@]}"; do
        for c in $(cat /proc/"$p"/task/*/children 2>/dev/null || true); do
            kill -KILL "$c" 2>/dev/null || true
        done
        kill -KILL "$p" 2>/dev/null || true
    done
    for c in "${CONTAINERS[@]}"; do bh rm "$c" >/dev/null 2>&1 || true; done
    if [ -d "$WORK/rootfs" ]; then
        umount -R "$WORK/rootfs/proc" "$WORK/rootfs/sys" 2>/dev/null || true
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'echo "test-container: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

# --- tools -------------------------------------------------------------------
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq -o DPkg::Lock::Timeout=300 </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
        "${missing[@]}" </dev/null >/dev/null
fi
# Containers left by an interrupted run (the lock says no other run is using them).
bh rm --all >/dev/null

# --- the host's package sources ------------------------------------------------
# apt: the source files apt reads here, the keyrings they name, and the config
# files that set only Acquire:: options (a proxy, snapshot validity, ...; hooks
# such as Post-Invoke are left out). CA certificates added to this machine.
apt_sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && apt_sources+=("$f")
done
[ ${#apt_sources[@]} -gt 0 ] || fail "no apt sources in /etc/apt"
apt_confs=()
for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
    [ -f "$f" ] || continue
    if grep -q 'Acquire' "$f" && ! grep -qi 'invoke' "$f"; then apt_confs+=("$f"); fi
done
extra_cas=()
for f in /usr/local/share/ca-certificates/*.crt; do [ -f "$f" ] && extra_cas+=("$f"); done

# The Debian archive that serves bookworm, for debootstrap.
mirror="$(python3 - "${apt_sources[@]}" <<'EOF'
import re, sys
for path in sys.argv[1:]:
    text = open(path, encoding="utf-8").read()
    if path.endswith(".sources"):
        for block in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"(?m)^(\w[\w-]*):\s*(.*)$", block))
            if fields.get("Enabled", "yes").lower() == "no":
                continue
            if "deb" in fields.get("Types", "").split() and "bookworm" in fields.get("Suites", "").split():
                print(fields["URIs"].split()[0]); raise SystemExit
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                print(words[1]); raise SystemExit
EOF
)"
[ -n "$mirror" ] || fail "no apt source for bookworm in ${apt_sources[*]}"

# pip: the host's effective index settings, as pip itself resolves them; local
# directories (file: URLs, paths) are left out, as a container cannot see them.
python3 - "$WORK/pip.conf" <<'EOF'
import sys
settings = {}
try:
    from pip._internal.configuration import Configuration
    config = Configuration(isolated=False)
    config.load()
    merged = dict(config.items())
    for option in ("index-url", "extra-index-url", "find-links", "trusted-host"):
        for key in (":env:." + option, "install." + option, "global." + option):
            if merged.get(key):
                settings[option] = merged[key].split()
                break
except Exception as exc:  # no pip here, or its internals moved: PyPI by default
    print(f"test-container: host pip settings not read ({exc}); using pip's defaults",
          file=sys.stderr)
with open(sys.argv[1], "w", encoding="utf-8") as conf:
    conf.write("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    for option, values in settings.items():
        kept = [v for v in values if option == "trusted-host" or v.startswith(("http:", "https:"))]
        if kept:
            conf.write(f"{option} = {' '.join(kept)}\n")
EOF

# --- the base image -------------------------------------------------------------
base_key="$( { echo "$BASE_PACKAGES $mirror"; cat "${apt_sources[@]}" "${apt_confs[@]}" "${extra_cas[@]}" "$WORK/pip.conf"; } \
    | sha256sum | cut -c1-12)"
BASE="localhost/db-job-worker-base:bookworm-$base_key"
started=$(now)
if bh inspect --type image "$BASE" >/dev/null 2>&1; then
    say "base $BASE (cached in $STORE)"
else
    say "building base $BASE: debootstrap bookworm from $mirror"
    rootfs="$WORK/rootfs"
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$mirror" \
            > "$LOGS/debootstrap.log" 2>&1 </dev/null; then
        tail -20 "$LOGS/debootstrap.log" >&2
        fail "debootstrap (log: $LOGS/debootstrap.log)"
    fi
    rm -f "$rootfs/etc/apt/sources.list"
    for f in "${apt_sources[@]}"; do
        install -D -m 0644 "$f" "$rootfs$f"
        for keyring in $(grep -ohiE '(signed-by[=:] *)[^] ]+' "$f" | sed -E 's/^[^=:]*[=:] *//' || true); do
            [ -f "$keyring" ] && [ ! -e "$rootfs$keyring" ] && install -D -m 0644 "$keyring" "$rootfs$keyring"
        done
    done
    for f in "${apt_confs[@]}"; do install -D -m 0644 "$f" "$rootfs$f"; done
    install -m 0644 "$WORK/pip.conf" "$rootfs/etc/pip.conf"
    if [ ${#extra_cas[@]} -gt 0 ]; then
        install -m 0644 "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates > "$LOGS/update-ca-certificates.log" 2>&1
    fi
    # As in the official slim images: no package lists, no downloaded packages.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log "$rootfs"/debootstrap
    ctr="$(bh from scratch)"
    CONTAINERS+=("$ctr")
    mnt="$(bh mount "$ctr")"
    tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
    bh umount "$ctr" >/dev/null
    bh config --env LANG=C.UTF-8 \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd python3 --label "org.opencontainers.image.description=Debian bookworm + python3.11 (debootstrap, test-container.sh)" \
        "$ctr"
    bh commit --quiet --rm "$ctr" "$BASE" >/dev/null
    rm -rf "$rootfs"
    # Older bases (other sources or package lists) are not needed any more.
    for old in $(bh images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/db-job-worker-base:' | grep -vx "$BASE" || true); do
        bh rmi "$old" >/dev/null 2>&1 || true
    done
fi
base_seconds=$(since "$started")

# --- the images ----------------------------------------------------------------
declare -A build_seconds
for driver in "${DRIVERS[@]}"; do
    started=$(now)
    log="$LOGS/build-$driver.log"
    # --format docker: the OCI format has no HEALTHCHECK and buildah would drop it.
    if ! bh bud --isolation chroot --layers --network host --pull=never --format docker \
            --build-arg BASE_IMAGE="$BASE" --build-arg ODBC_DRIVER="$driver" \
            -f Dockerfile -t "$IMAGE:$driver" . > "$log" 2>&1 </dev/null; then
        tail -30 "$log" >&2
        fail "building $IMAGE:$driver (log: $log)"
    fi
    build_seconds[$driver]=$(since "$started")
    say "built $IMAGE:$driver in ${build_seconds[$driver]} s"
done

# --- the checks ------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run CONTAINER [buildah run options] -- COMMAND...: output in $WORK/out, $WORK/err.
run_in() {
    local ctr="$1" options=()
    shift
    while [ "$1" != "--" ]; do options+=("$1"); shift; done
    bh run --isolation chroot --network host "${options[@]}" "$ctr" "$@" \
        > "$WORK/out" 2> "$WORK/err.raw" </dev/null && rc=0 || rc=$?
    # buildah's own lines about the exit status are not the command's output.
    grep -vE '^(subprocess exited with status [0-9]+|Error: exit status [0-9]+)$' \
        "$WORK/err.raw" > "$WORK/err" || true
}

# The same, for a command that always prints: twice in these runs (of some hundred)
# buildah relayed nothing at all from a command that exited 0; that is buildah's
# slip, not the image's, so such a run is tried once more, and said so.
run_printing() {
    run_in "$@"
    if [ "$rc" -eq 0 ] && [ ! -s "$WORK/out" ]; then
        say "(buildah relayed no output; running it once more)"
        run_in "$@"
    fi
}

show() { sed 's/^/    | /' "$@"; }

# The one error line of --check --connect: exit 69, one line on stderr naming the
# driver and the address, and no password anywhere.
expect_unavailable() {
    local what="$1" odbc_name="$2" address="$3" password="$4"
    show "$WORK/err"
    [ "$rc" -eq 69 ] || fail "$what: exit $rc, expected 69"
    [ "$(grep -c . "$WORK/err")" -eq 1 ] || fail "$what: expected one line on stderr"
    grep -qF "$address" "$WORK/err" || fail "$what: the line does not name $address"
    grep -qiF "$odbc_name" "$WORK/err" || fail "$what: the line does not name the driver $odbc_name"
    ! grep -qF "$password" "$WORK/out" "$WORK/err" || fail "$what: the password was printed"
}

# The TDS test server (tests/sqlserver, when this checkout has it), on the host.
tds_port=""
start_tds_server() {
    local python=python3 log="$WORK/tds.log"
    [ -x .venv/bin/python ] && python=.venv/bin/python
    # The one password the server accepts (any other gets 18456, login failed).
    read -r tds_user tds_password < <("$python" -c \
        'from tests.sqlserver.process import USER, PASSWORD; print(USER, PASSWORD)') \
        || fail "tests/sqlserver/process.py: no USER, PASSWORD"
    "$python" -m tests.sqlserver --port 0 --database "$WORK/tds.db" \
        > "$log" 2>&1 </dev/null 9>&- &
    SERVER_PIDS+=($!)
    for _ in $(seq 1 100); do
        tds_port="$(sed -nE 's/^listening on 127\.0\.0\.1:([0-9]+)$/\1/p' "$log")"
        [ -n "$tds_port" ] && { say "TDS test server on 127.0.0.1:$tds_port"; return 0; }
        kill -0 "${SERVER_PIDS[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    show "$log"
    fail "the TDS test server did not start"
}
if [ -f tests/sqlserver/__main__.py ]; then start_tds_server; fi

# A daemon job that takes a while, so that SIGTERM arrives while it runs.
mkdir -p "$WORK/drain"
cat > "$WORK/drain/slowjobs.py" <<'EOF'
import logging
import time


def slow(session, seconds):
    logging.getLogger("slowjobs").info("slow job started")
    time.sleep(seconds)
    logging.getLogger("slowjobs").info("slow job finished")
EOF
cat > "$WORK/drain/jobs.yaml" <<'EOF'
database:
  url: sqlite:////data/drain.db
worker:
  max_workers: 2
  shutdown_timeout: 20s
jobs:
  - name: slow
    call: slowjobs:slow
    kwargs: {seconds: 3}
    every: 1s
EOF
shutdown_timeout=20

check_image() {
    local driver="$1" odbc_name="$2" url_options="$3"
    local image="$IMAGE:$driver" ctr config
    say "--- $image"

    bh inspect --type image "$image" > "$WORK/inspect.json"
    mapfile -t config < <(python3 -c '
import json, sys
config = json.load(open(sys.argv[1]))["OCIv1"]["config"]
print(config.get("User", ""))
print(config.get("StopSignal", ""))
for arg in (config.get("Entrypoint") or []) + (config.get("Cmd") or []):
    print(arg)' "$WORK/inspect.json")
    local user="${config[0]}" stopsignal="${config[1]}"
    local default_command=("${config[@]:2}")
    say "image config: user $user, stop signal $stopsignal, command ${default_command[*]}"
    [ "$user" = worker ] || fail "$image: USER is '$user', expected worker"
    [ "$stopsignal" = SIGTERM ] || fail "$image: STOPSIGNAL is '$stopsignal'"
    [ ${#default_command[@]} -gt 0 ] || fail "$image: no ENTRYPOINT/CMD"
    mapfile -t docker_config < <(python3 -c '
import json, sys
config = json.load(open(sys.argv[1]))["Docker"]["config"]
print(" ".join(sorted(config.get("ExposedPorts") or {})))
print(json.dumps((config.get("Healthcheck") or {}).get("Test")))' "$WORK/inspect.json")
    say "docker format: exposed ${docker_config[0]}, health check ${docker_config[1]}"
    [ "${docker_config[0]}" = 9464/tcp ] || fail "$image: EXPOSE is '${docker_config[0]}', expected 9464/tcp"
    case "${docker_config[1]}" in
        '["CMD", "python3", "-c", '*) ;;
        *) fail "$image: no Python HEALTHCHECK in the image config (built in the docker format?)" ;;
    esac

    ctr="$(bh from --pull=never "$image")"
    CONTAINERS+=("$ctr")

    say "the default command"
    run_printing "$ctr" -- "${default_command[@]}"
    show "$WORK/out"
    [ "$rc" -eq 0 ] || { show "$WORK/err"; fail "$image: the default command exited $rc"; }
    for job in enqueue-commands process-commands purge-commands; do
        grep -qE "^$job +success" "$WORK/out" || fail "$image: no success line for $job"
    done
    grep -q '^3 job(s): 3 succeeded, 0 failed' "$WORK/out" || fail "$image: no summary line"

    run_printing "$ctr" -- id -u
    say "id -u: $(cat "$WORK/out")"
    grep -qxE '[1-9][0-9]*' "$WORK/out" || { show "$WORK/err.raw"; fail "$image: id -u exited $rc, printed '$(cat "$WORK/out")' (root, or no answer)"; }

    run_printing "$ctr" -- ls -A /app
    [ "$rc" -eq 0 ] && [ -s "$WORK/out" ] || { show "$WORK/err.raw"; fail "$image: ls -A /app exited $rc"; }
    say "ls -A /app: $(tr '\n' ' ' < "$WORK/out")"
    run_printing "$ctr" -- sh -c '
        for c in cc gcc g++ c++ clang tcc make; do command -v "$c"; done
        find /app \( -name .git -o -name .venv -o -name "*.db" -o -name "*.db-*" -o -name __pycache__ \
            -o -name "*.egg-info" -o -name Dockerfile -o -name .pytest_cache \) -print
        find /var/lib/apt/lists -type f -print
        find /var/cache/apt /root/.cache /tmp -name "*.deb" -o -name "*.bin" -o -name "*.whl" 2>/dev/null
        echo "(end of list)"'
    if [ "$(cat "$WORK/out")" != "(end of list)" ]; then
        show "$WORK/out"
        fail "$image holds files it must not (above), or the listing did not finish"
    fi
    say "no compiler, no apt lists, no .git/.venv/databases/caches in the image"

    # The metrics extra: a `metrics:` section passes --check (it exits 78 without it).
    run_printing "$ctr" -- sh -c 'printf "database: {url: \"sqlite:////data/m.db\"}\nmetrics: {port: 9464}\njobs: [{name: a, call: \"jobs.commands:purge_processed\"}]\n" > /tmp/metrics.yaml && run-worker -c /tmp/metrics.yaml --check'
    [ "$rc" -eq 0 ] || { show "$WORK/out" "$WORK/err"; fail "$image: a metrics section does not pass --check (the metrics extra?)"; }
    say "a metrics: section passes --check (prometheus-client installed)"

    run_printing "$ctr" -- odbcinst -q -d
    grep -qxF "[$odbc_name]" "$WORK/out" || fail "$image: ODBC driver '$odbc_name' not registered"

    # --check --connect through the image's SQL Server driver.
    local password="Not-Printed-$RANDOM$RANDOM" port url
    if [ -n "$tds_port" ]; then
        url="mssql+pyodbc://$tds_user:$tds_password@127.0.0.1:$tds_port/test?$url_options"
        say "--check --connect to the TDS test server at 127.0.0.1:$tds_port ($odbc_name)"
        run_in "$ctr" -e "WORKER_DATABASE_URL=$url" -- run-worker --check --connect
        show "$WORK/out" "$WORK/err"
        [ "$rc" -eq 0 ] || fail "$image: --check --connect exited $rc"
        grep -q "^connected to " "$WORK/out" || fail "$image: no 'connected to' line"
        ! grep -qF "$tds_user:$tds_password@" "$WORK/out" "$WORK/err" || fail "$image: the password was printed"

        url="mssql+pyodbc://$tds_user:$password@127.0.0.1:$tds_port/test?$url_options"
        say "--check --connect with a wrong password"
        run_in "$ctr" -e "WORKER_DATABASE_URL=$url" -- run-worker --check --connect
        expect_unavailable "$image: wrong password" "$odbc_name" "127.0.0.1:$tds_port" "$password"
        grep -q "18456" "$WORK/err" || fail "$image: wrong password: not the server's 18456"
    fi
    port=$(free_port)  # nothing listens there
    url="mssql+pyodbc://sa:$password@127.0.0.1:$port/test?$url_options"
    say "--check --connect to a closed port, 127.0.0.1:$port ($odbc_name)"
    started=$(now)
    run_in "$ctr" -e "WORKER_DATABASE_URL=$url" -- run-worker --check --connect
    expect_unavailable "$image: closed port" "$odbc_name" "127.0.0.1:$port" "$password"
    say "exit 69 after $(since "$started") s"

    # The daemon as the container's main process, PID 1 of its own PID namespace as
    # under Docker (PID 1 gets only the signals it handles): buildah's chroot
    # isolation has no PID namespace and answers SIGTERM by killing its command, so
    # this runs the container's file system with unshare + chroot, as the image's
    # user, with its environment and working directory.
    say "daemon as PID 1: SIGTERM while a job runs (shutdown_timeout ${shutdown_timeout}s)"
    local mnt uid gid
    mnt="$(bh mount "$ctr")"
    install -d "$mnt/etc/worker"
    install -m 0644 "$WORK/drain/jobs.yaml" "$WORK/drain/slowjobs.py" "$mnt/etc/worker/"
    uid="$(awk -F: -v u="$user" '$1 == u { print $3 }' "$mnt/etc/passwd")"
    gid="$(awk -F: -v u="$user" '$1 == u { print $4 }' "$mnt/etc/passwd")"
    [ -n "$uid" ] || fail "$image: user $user not in /etc/passwd"
    mapfile -t image_env < <(python3 -c '
import json, sys
config = json.load(open(sys.argv[1]))["OCIv1"]["config"]
print(config.get("WorkingDir") or "/")
for item in config.get("Env") or []:
    print(item)' "$WORK/inspect.json")
    unshare --pid --fork --kill-child --mount --mount-proc="$mnt/proc" \
        bash -c 'root=$1 uid=$2 gid=$3; shift 3
                 mount --rbind /dev "$root/dev" && exec chroot --userspec="$uid:$gid" --groups="$gid" "$root" "$@"' _ \
        "$mnt" "$uid" "$gid" /usr/bin/env -i -C "${image_env[0]}" "${image_env[@]:1}" HOME=/home/worker \
        WORKER_CONFIG=/etc/worker/jobs.yaml PYTHONPATH=/etc/worker \
        "${default_command[0]}" --log-format json > "$WORK/daemon.log" 2>&1 </dev/null 9>&- &
    local runner=$! worker_pid="" stopped took
    DAEMON_PIDS+=("$runner")
    for _ in $(seq 1 300); do
        grep -q '"slow job started"' "$WORK/daemon.log" && break
        kill -0 "$runner" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q '"slow job started"' "$WORK/daemon.log"; then
        show "$WORK/daemon.log"
        kill -KILL "$runner" 2>/dev/null || true
        wait "$runner" && rc=0 || rc=$?
        fail "$image: the daemon did not start a job (exit status $rc)"
    fi
    read -r worker_pid _ < <(cat /proc/"$runner"/task/*/children) || true
    say "the daemon: $(grep -E '^NSpid' /proc/"$worker_pid"/status | tr -s '\t ' ' ') (host, namespace), $(tr '\0' ' ' < /proc/"$worker_pid"/cmdline)"
    grep -qE '^NSpid:\s+[0-9]+\s+1$' /proc/"$worker_pid"/status || fail "$image: the daemon is not PID 1"
    stopped=$(now)
    kill -TERM "$worker_pid"
    timeout $((shutdown_timeout + 10)) tail -s 0.1 --pid="$runner" -f /dev/null || true
    kill -KILL "$runner" 2>/dev/null || true  # still running: a failure, below
    wait "$runner" && rc=0 || rc=$?
    took=$(since "$stopped")
    show "$WORK/daemon.log"
    [ "$rc" -eq 0 ] || fail "$image: the daemon exited $rc after SIGTERM"
    awk -v t="$took" -v limit="$shutdown_timeout" 'BEGIN { exit !(t < limit) }' \
        || fail "$image: the daemon took ${took}s to stop"
    grep -q '"slow job finished"' "$WORK/daemon.log" || fail "$image: the running job was not drained"
    grep -q 'daemon stopped' "$WORK/daemon.log" || fail "$image: no 'daemon stopped' line"
    say "daemon: SIGTERM -> the running job finished, exit 0 after ${took} s"
    bh umount "$ctr" >/dev/null

    bh rm "$ctr" >/dev/null
}

check_image msodbcsql18-pypi "ODBC Driver 18 for SQL Server" "driver=ODBC+Driver+18+for+SQL+Server&Encrypt=no"
check_image freetds FreeTDS "driver=FreeTDS&TDS_Version=7.4"

# Images that lost their tag to a newer build; the layer cache of the current ones stays.
bh rmi --prune >/dev/null
say "--- summary"
[ -n "$tds_port" ] || say "(no tests/sqlserver in this checkout: --check --connect was tried against closed ports only)"
say "base image: ${base_seconds} s"
for driver in "${DRIVERS[@]}"; do say "build $driver: ${build_seconds[$driver]} s"; done
bh images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "^($IMAGE|localhost/db-job-worker-base):" \
    | sed 's/^/test-container: size /'
say "all checks passed in $(since "$started_all") s"
