#!/usr/bin/env bash
# System packages the tests use: Debian's Chromium for the web UI test (driven by Playwright; no
# browser is downloaded). Installed only where apt-get runs as root; elsewhere that test skips.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "warning: could not install chromium; the web UI test will be skipped" >&2
else
  echo "note: chromium missing and apt-get unavailable; the web UI test will be skipped" >&2
fi
exit 0
