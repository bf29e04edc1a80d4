#!/usr/bin/env bash
# Install, build the demo models (first run only, a few minutes on 2 cores), start everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh models
. .venv/bin/activate
exec inferline up "$@"
