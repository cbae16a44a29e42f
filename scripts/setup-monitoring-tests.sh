#!/usr/bin/env bash
# For tests/test_monitoring.py: Debian's chromium renders the status page headless
# (and takes the screenshot docs/monitoring.md shows). Installed only when missing;
# if it cannot be installed, the browser test skips and says why.
set -uo pipefail

if command -v chromium >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup-monitoring-tests.sh: installing chromium (headless status-page test)"
if ! { $SUDO apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }; then
    echo "setup-monitoring-tests.sh: could not install chromium; the browser test will skip" >&2
fi
exit 0
