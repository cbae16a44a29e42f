#!/usr/bin/env bash
# Runs deploy/systemd/ under a real systemd on a machine whose PID 1 is not systemd:
# systemd becomes PID 1 of throw-away pid/mount/cgroup namespaces, with private
# /run, /root, /sys/fs/cgroup (systemd remounts that read-only: it must not be the
# host's) and overlays on /etc, /opt and /var, so nothing outside changes except
# the empty cgroups it creates, which are removed at the end. Needs root, unshare,
# nsenter and the systemd package. Not part of the test suite (a minute, root only).
#
#   bash scripts/systemd-trial.sh
#
# What it shows (the numbers in docs/operations.md, "systemd", come from here):
# 1. the old unit's ExecStartPre=--check exiting 78 is restarted again and again;
# 2. the current unit with the same broken config: failed at once, no restart;
#    a main process exiting 69: no restart; exiting 1: restarted;
# 3. the current units, sandbox and all, run jobs (SQLite in /var/lib/run-worker,
#    MariaDB over TCP when it answers on 127.0.0.1:3306), reach READY, survive the
#    watchdog, reload, and keep their locks in /run/run-worker.
# The only change to the units: a drop-in that keeps them off sysinit.target (its
# tmpfiles and journald would touch the shared host) and sends output to a file.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--inner" ]; then
    T=$2
    mount --make-rprivate /
    # A private /sys/fs/cgroup holding the same hierarchies: systemd remounts its
    # tmpfs read-only and adds directories to it.
    mkdir -p "$T/cg"
    mount -t tmpfs -o mode=755 tmpfs "$T/cg"
    while read -r dir; do
        name=${dir#/sys/fs/cgroup/}
        mkdir -p "$T/cg/$name"
        mount --bind "$dir" "$T/cg/$name"
    done < <(findmnt -rn -o TARGET | grep '^/sys/fs/cgroup/')
    mount --move "$T/cg" /sys/fs/cgroup
    for d in etc opt var; do
        mkdir -p "$T/$d-up" "$T/$d-work"
        mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d-up,workdir=$T/$d-work" "/$d"
    done
    mount -t tmpfs tmpfs /run
    # /root is 0700: a venv whose Python lives under it (pyenv) is out of reach of
    # User=worker. Make it traversable here; the units get ProtectHome=tmpfs for it.
    python_home=$(dirname "$(dirname "$(readlink -f "$ROOT/.venv/bin/python3")")")
    case $python_home in /root/*)
        mkdir -p "$T/pyhome"; mount --bind /root "$T/pyhome"
        mount -t tmpfs -o mode=755 tmpfs /root
        mkdir -p "/root/${python_home#/root/}"
        mount --bind "$T/pyhome/${python_home#/root/}" "$python_home" ;;
    esac
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin worker
    mkdir -p /opt/run-worker /etc/run-worker /run/systemd/system /run/trial
    mount --bind "$ROOT" /opt/run-worker
    cp -r "$T/units/." /run/systemd/system/
    exec env container=systemd-trial /lib/systemd/systemd --system --unit=trial.target
fi

[ "$(id -u)" -eq 0 ] || { echo "systemd-trial.sh: run as root" >&2; exit 1; }
T=$(mktemp -d /tmp/systemd-trial.XXXXXX)
mkdir -p "$T/units"
printf '[Unit]\nDescription=systemd-trial\nDefaultDependencies=no\n' >"$T/units/trial.target"
python_home=$(dirname "$(dirname "$(readlink -f "$ROOT/.venv/bin/python3")")")
add_unit() {   # add_unit NAME SOURCE
    cp "$2" "$T/units/$1"
    mkdir -p "$T/units/$1.d"
    printf '[Unit]\nDefaultDependencies=no\n[Service]\nStandardOutput=append:/run/trial/%s.log\nStandardError=inherit\n' \
        "$1" >"$T/units/$1.d/trial.conf"
    case $python_home in /root/*|/home/*)
        printf '[Service]\nProtectHome=tmpfs\nBindReadOnlyPaths=%s\n' "$python_home" \
            >"$T/units/$1.d/python-home.conf" ;;
    esac
}
add_unit run-worker.service deploy/systemd/run-worker.service
add_unit run-worker-batch.service deploy/systemd/run-worker-batch.service
# The unit as it was before: ExecStartPre=--check, no sandbox.
git show c4150a4:deploy/systemd/run-worker.service >"$T/old.service"
add_unit old-run-worker.service "$T/old.service"

before=$(ls /sys/fs/cgroup; grep ' /sys/fs/cgroup' /proc/self/mountinfo)
setsid unshare --pid --fork --mount --uts --ipc --cgroup --mount-proc \
    bash "$0" --inner "$T" >"$T/console.log" 2>&1 &
unshare_pid=$!
init=""
for _ in $(seq 1 100); do
    init=$(pgrep -P "$unshare_pid" -x systemd || true)
    [ -n "$init" ] && nsenter -t "$init" -m -p test -S /run/systemd/private && break
    sleep 0.1
done
[ -n "$init" ] || { cat "$T/console.log"; echo "systemd did not start" >&2; exit 1; }
in_ns() { nsenter -t "$init" -m -p "$@"; }
show() { in_ns systemctl show "$1" -p ActiveState -p SubState -p NRestarts -p ExecMainStatus \
         | sort | tr '\n' ' '; echo; }
config() { in_ns sh -c "cat >/etc/run-worker/jobs.yaml; chown root:worker /etc/run-worker/jobs.yaml; chmod 0640 /etc/run-worker/jobs.yaml"; }
cleanup() {
    kill -KILL "$init" 2>/dev/null || true
    wait "$unshare_pid" 2>/dev/null || true
    for h in /sys/fs/cgroup/*/; do
        for d in init.scope system.slice; do
            [ -d "$h$d" ] && find "$h$d" -depth -type d -exec rmdir {} + 2>/dev/null
        done
    done
    rm -rf --one-file-system "$T"
    after=$(ls /sys/fs/cgroup; grep ' /sys/fs/cgroup' /proc/self/mountinfo)
    if [ "$before" = "$after" ]; then echo "host /sys/fs/cgroup unchanged"
    else echo "WARNING: host /sys/fs/cgroup changed:"; diff <(echo "$before") <(echo "$after"); fi
}
trap cleanup EXIT

printf 'database:\n  url: "sqlite:////var/lib/run-worker/w.db"\njobs:\n  - name: typo\n    call: tests.jobfuncs:does_not_exist\n' | config
echo "== 1. old unit (ExecStartPre=--check), invalid config, 45 s:"
in_ns systemctl start old-run-worker.service 2>/dev/null || true
sleep 45; show old-run-worker.service
in_ns systemctl stop old-run-worker.service
echo "== 2. current unit, same config, 15 s:"
in_ns systemctl start run-worker.service 2>/dev/null || true
sleep 15; show run-worker.service
for code in 69 1; do
    in_ns sh -c "printf '[Service]\nExecStart=\nExecStart=/bin/sh -c \"exit $code\"\n' >/run/systemd/system/run-worker.service.d/zz-exit.conf"
    in_ns systemctl daemon-reload; in_ns systemctl reset-failed
    in_ns systemctl start run-worker.service 2>/dev/null || true
    sleep 12; echo "   main process exiting $code:"; show run-worker.service
    in_ns systemctl stop run-worker.service
done
in_ns rm /run/systemd/system/run-worker.service.d/zz-exit.conf
in_ns systemctl daemon-reload; in_ns systemctl reset-failed

echo "== 3. current units, a good config (SQLite), 40 s (WatchdogSec=30):"
printf 'database:\n  url: "sqlite:////var/lib/run-worker/w.db"\njobs:\n  - name: tick\n    call: tests.jobfuncs:select_one\n    every: 1s\n' | config
in_ns systemctl start run-worker.service
in_ns systemctl reload run-worker.service
sleep 40; show run-worker.service
echo "   runs that succeeded: $(in_ns grep -c 'succeeded' /run/trial/run-worker.service.log)"
in_ns systemctl start run-worker-batch.service && echo "   batch: exit 0"
in_ns ls -l /run/run-worker/
in_ns systemctl stop run-worker.service
in_ns test -d /run/run-worker && echo "   /run/run-worker kept after stop"
if mariadb-admin --protocol=tcp -h127.0.0.1 -uworker_test -pworker_test ping >/dev/null 2>&1; then
    echo "== 3b. MariaDB through ODBC over TCP, password from /etc/run-worker/env:"
    in_ns sh -c 'umask 077; printf "DB_PASSWORD=worker_test\n" >/etc/run-worker/env'
    printf 'database:\n  url: "mysql+pyodbc://worker_test:${DB_PASSWORD}@127.0.0.1/worker_test?driver=MariaDB+Unicode&Port=3306"\njobs:\n  - name: tick\n    call: tests.jobfuncs:select_one\n    every: 1s\n' | config
    in_ns systemctl start run-worker.service; sleep 4; show run-worker.service
    in_ns systemctl stop run-worker.service
    in_ns systemctl start run-worker-batch.service && echo "   batch: exit 0"
fi
