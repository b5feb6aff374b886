# Sourced by the other scripts: create (once) and activate .venv with fastpeft installed.
# FASTPEFT_TORCH overrides the torch requirement (default: torch==2.13.0, a CPU build where
# no CUDA wheel is wanted; on a GPU machine any torch 2.11-2.13 that is already installed is kept).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTPEFT_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.fastpeft-installed$EXTRAS"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    if ! python -c "import torch" 2>/dev/null; then
        python -m pip install -q "${FASTPEFT_TORCH:-torch==2.13.0}"
    fi
    python -m pip install -q -e "$ROOT$EXTRAS"
    touch "$stamp"
fi
