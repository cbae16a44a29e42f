#!/usr/bin/env bash
# For tests/test_monitoring.py and tests/test_deploy.py: Debian's chromium renders the
# status page headless (and takes the screenshot docs/monitoring.md shows), and
# promtool (Debian's `prometheus`, without recommends) tests the shipped alert rules
# (deploy/prometheus/). Installed only when missing; what cannot be installed makes
# its tests skip and say why.
set -uo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup-monitoring-tests.sh: installing ${missing[*]} (status page, alert rules)"
if ! { $SUDO apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
           --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "setup-monitoring-tests.sh: could not install ${missing[*]}; their tests will skip" >&2
fi
exit 0
