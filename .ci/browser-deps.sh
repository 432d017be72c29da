#!/usr/bin/env bash
# Debian's chromium for the browser tests (never a downloaded browser build).
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "could not install chromium; browser tests will be skipped" >&2
else
    echo "chromium not found: install it (apt-get install chromium) to run the browser tests" >&2
fi
exit 0
