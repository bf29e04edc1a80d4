#!/usr/bin/env bash
# Install what the tests need, then run them (real Redis, real worker processes, small real models).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh models,test
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
