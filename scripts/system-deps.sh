#!/usr/bin/env bash
# Installs the system packages the test suite drives for real, where they are missing:
# redis-server (tests start private ones), nginx (the repo's nginx.conf runs in front of two APIs)
# and chromium (browser tests). Debian/Ubuntu with apt-get, as root; elsewhere it says what is missing.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need+=(nginx)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts services it installs; the tests run their own, on free ports.
  (service nginx stop || true) >/dev/null 2>&1
else
  echo "system-deps: missing ${need[*]}; install them (e.g. sudo apt-get install ${need[*]})" >&2
  exit 1
fi
