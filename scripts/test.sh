#!/usr/bin/env bash
# Install what the tests need, then run them (real Redis, real worker processes, small real models).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh models,test
# The security tests run a TLS Redis (Debian's redis-server is built with TLS) and make certificates with openssl.
if ! { [ -x /usr/bin/redis-server ] && command -v openssl >/dev/null; }; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server openssl >/dev/null
  else
    echo "test.sh: no /usr/bin/redis-server or openssl; the TLS Redis tests will be skipped" >&2
  fi
fi
# The fault suite's failover test runs Debian's redis-sentinel (tests/test_faults.py skips it, saying so, without).
if ! command -v redis-sentinel >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && apt-get install -y -qq redis-sentinel >/dev/null; } \
      || echo "test.sh: could not install redis-sentinel; the Sentinel failover test will be skipped" >&2
  else
    echo "test.sh: no redis-sentinel; the Sentinel failover test will be skipped" >&2
  fi
fi
# The observability tests run Debian's Prometheus (a real server, and promtool) against a live gateway.
if ! command -v promtool >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq prometheus >/dev/null || echo "test.sh: apt-get install prometheus failed" >&2
  else
    echo "test.sh: no promtool and no root apt-get; the Prometheus tests will be skipped" >&2
  fi
fi
. .venv/bin/activate
# Lint and types first (seconds; about a minute for mypy's first run): what the suite keeps clean stays clean.
ruff check .
mypy
# Two test processes (pytest-xdist), a module or a shared set of processes at a time (tests/conftest.py): the tests
# wait on real processes much of the time, so two of them fill 2 cores (~8 min where one took ~13). `-n 0`: one.
exec python -m pytest -q -p no:cacheprovider -n 2 "$@"
