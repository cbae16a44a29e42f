#!/usr/bin/env bash
# For tests/test_deploy.py: systemd-analyze, to verify deploy/systemd/ offline (no
# running systemd needed). Debian package `systemd` without recommends: measured
# 5.7 MB to download with the libraries a slim image lacks, about 20 MB unpacked,
# seconds to install. If it cannot be installed, those tests skip and say why.
set -uo pipefail

if command -v systemd-analyze >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup-deploy-tests.sh: installing systemd (for systemd-analyze)"
if ! { $SUDO apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
           --no-install-recommends systemd >/dev/null; }; then
    echo "setup-deploy-tests.sh: could not install systemd; the unit-file tests will skip" >&2
fi
exit 0
