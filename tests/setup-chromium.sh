#!/bin/sh
# The browser of the tests (`make test`): Debian's chromium, in which tests/test_history.py opens bench.history's HTML
# report. Installed where it may be (root with apt-get, as in CI); elsewhere it says what to install, and that test is
# skipped with the same words, except in CI (CI=true), where a missing browser fails it.
set -eu
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi
command -v chromium >/dev/null 2>&1 \
    || echo "chromium missing: the HTML report's browser test is skipped (fails in CI); to add it: apt-get install -y chromium"
