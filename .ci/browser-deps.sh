#!/usr/bin/env bash
# Debian's chromium for the browser tests (never a downloaded browser build), and a check that
# the project's python has playwright.
# Under CI (CI set and not "false"/"0"/"no") anything missing is an error: exit 1, so a CI run
# can't pass with the browser tests skipped. Elsewhere it warns and the browser tests skip,
# saying why.
set -u
case "$0" in */*) HERE="${0%/*}" ;; *) HERE=. ;; esac
ROOT="$(cd "$HERE/.." && pwd)"
PY="${VENV:-$ROOT/.venv}/bin/python"
ci="${CI:-}"
case "${ci,,}" in "" | 0 | false | no) IN_CI=0 ;; *) IN_CI=1 ;; esac

missing() {
    if [ "$IN_CI" = 1 ]; then
        echo "browser-deps: $1 (CI=$ci: the browser tests must run there)" >&2
        exit 1
    fi
    echo "browser-deps: $1; the browser tests will be skipped" >&2
}

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
            || echo "browser-deps: apt-get install chromium failed" >&2
    fi
    command -v chromium >/dev/null 2>&1 \
        || missing "chromium not found: install it (apt-get install chromium, as root)"
fi
if [ ! -x "$PY" ]; then
    missing "no python at $PY to check playwright in (make install first)"
elif ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
    missing "playwright is not importable in $PY: pip install -e '.[test]'"
fi
exit 0
