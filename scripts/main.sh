#!/usr/bin/env bash
# Run fastpeft's main job (the embedded default) in .venv; extra args go to `fastpeft`.
set -euo pipefail
source "$(dirname "$0")/venv.sh" ""  # no extras; an explicit argument so ours are not passed on
cd "$ROOT"
exec fastpeft "$@"
