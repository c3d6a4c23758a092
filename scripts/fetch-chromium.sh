#!/usr/bin/env bash
# Debian's Chromium, for the report viewer's browser test (tests/cli/evals.rs). Installs the `chromium`
# package with apt when no browser is there yet (as root, or through sudo); does nothing otherwise.
# PAI_CHROMIUM names another browser binary to use instead.
set -euo pipefail
browser="${PAI_CHROMIUM:-chromium}"
if command -v "$browser" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "fetch-chromium.sh: no $browser and no apt-get: install Chromium and set PAI_CHROMIUM to it" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q chromium >/dev/null
command -v chromium >/dev/null
