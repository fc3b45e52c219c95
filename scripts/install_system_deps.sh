#!/usr/bin/env bash
# Debian packages the tests and the quick start use: the Openclipart image-text set, and
# chromium for the web page test (Playwright drives /usr/bin/chromium; its own download is offline-blocked).
set -euo pipefail
need=()
dpkg -s openclipart-png >/dev/null 2>&1 || need+=(openclipart-png)
dpkg -s openclipart-svg >/dev/null 2>&1 || need+=(openclipart-svg)
dpkg -s chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need[@]}" >/dev/null; }
fi
