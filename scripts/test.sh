#!/usr/bin/env bash
# The test command: builds (or reuses) the ComfyUI host, lints the tree (ruff, configured in pyproject.toml), then runs
# every test against the host, in two processes that each hold one copy of the pack: the core and the lab's plain parts
# without ComfyUI (tests/core, tests/lab), then the host suite with ComfyUI and the pack loaded in-process (tests/host).
# Paths under tests/ choose what runs; every other argument (-q, -x, -k EXPR) goes to both.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/host/bootstrap_host.sh"
PY=$(sed -n 's/^FINEXTRACT_PYTHON=//p' "${FINEXTRACT_HOST_DIR:-$ROOT/.host}/host.env")
cd "$ROOT"
"$PY" -m ruff check --quiet . || { echo "ruff found the problems above: fix them before the tests run" >&2; exit 1; }

plain=() host=() options=()
for arg in "$@"; do
  case "$arg" in
    tests/host*) host+=("$arg") ;;
    tests/*) plain+=("$arg") ;;
    *) options+=("$arg") ;;
  esac
done
if [ ${#plain[@]} -eq 0 ] && [ ${#host[@]} -eq 0 ]; then plain=(tests/core tests/lab); host=(tests/host); fi

ran=0
run() {
  local rc=0
  "$PY" -m pytest "${options[@]}" "$@" || rc=$?
  case $rc in
    0) ran=1 ;;
    5) ;;  # the options selected no test in this process
    *) exit $rc ;;
  esac
}
[ ${#plain[@]} -eq 0 ] || run "${plain[@]}"
[ ${#host[@]} -eq 0 ] || run "${host[@]}"
[ $ran -eq 1 ] || { echo "no test selected" >&2; exit 5; }
