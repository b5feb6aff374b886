#!/usr/bin/env bash
# Run the linter, the formatter check and the test suite in .venv (created and filled on first
# use). Extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/venv.sh" "[test]"
cd "$ROOT"
ruff check .
ruff format --check .
exec pytest -q -n 2 "$@"
