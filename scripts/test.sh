#!/usr/bin/env bash
# Sets everything up (idempotent), then runs the test suite. Extra arguments
# go to pytest. CI sets UNIONFS_REQUIRE_ALL=1: a skipped test then fails.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
cd "$here"
exec "${UNIONFS_PREFIX:-/opt/unionfs}/venv/bin/python" -m pytest "$@"
