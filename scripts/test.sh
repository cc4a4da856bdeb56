#!/usr/bin/env bash
# The test command: builds (or reuses) the ComfyUI host, then runs every test against it. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap_host.sh"
PY=$(sed -n 's/^FINEXTRACT_PYTHON=//p' "${FINEXTRACT_HOST_DIR:-$ROOT/.host}/host.env")
cd "$ROOT"
exec "$PY" -m pytest tests "$@"
