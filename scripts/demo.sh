#!/usr/bin/env bash
# The main job: builds (or reuses) the ComfyUI host and the demo world, then extracts the world's fine-tuning photos
# with the DreamBooth and LoRA example workflows through a real ComfyUI server.
# Extra arguments go to lab/demo.py (--out DIR, --n0 N, --steps N, --cache DIR; see --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/host/bootstrap_host.sh" --no-browser  # the main job opens no browser
PY=$(sed -n 's/^FINEXTRACT_PYTHON=//p' "${FINEXTRACT_HOST_DIR:-$ROOT/.host}/host.env")
cd "$ROOT"
exec "$PY" -m lab.demo "$@"
