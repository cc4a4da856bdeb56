#!/usr/bin/env bash
# The GPU checks of the performance issue, in at most 10 minutes on one NVIDIA GPU; prints every figure.
#   1. the one-step exactness tests (the guider equals the paper's equations on the models evaluated alone, 1e-5) on
#      CUDA in fp32 without TF32: DreamBooth, LoRA on both paths, every adapter type, the CFG patches;
#   2. time per step and peak GPU memory, CFG vs FineXtract (DreamBooth; LoRA by the side branch and by hooks), fp16,
#      random-weight SD 1.5 (512 px) and SDXL (1024 px) UNets, and two forwards of batch B against one of 2B;
#   3. the Candidate Bank node at batch 8 (time per candidate, the bank's share of it);
#   4. SSCD throughput, batched against one image at a time.
# Needs a host as the tests use one: .host/ from tools/host/bootstrap_host.sh, or FINEXTRACT_COMFYUI and
# FINEXTRACT_PYTHON (a ComfyUI tree and a Python with its requirements and a CUDA torch). Every step has its own
# time limit, so one that hangs cannot take the others' time; a step that fails is reported and the next one runs.
#     bash benchmarks/gpu_check.sh [LOG]      (LOG: also write everything there)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HOST_ENV=${FINEXTRACT_HOST_DIR:-$ROOT/.host}/host.env
PY=${FINEXTRACT_PYTHON:-$( [ -f "$HOST_ENV" ] && sed -n 's/^FINEXTRACT_PYTHON=//p' "$HOST_ENV")}
[ -n "$PY" ] || { echo "no host: run tools/host/bootstrap_host.sh or set FINEXTRACT_COMFYUI and FINEXTRACT_PYTHON" >&2; exit 2; }
[ $# -ge 1 ] && exec > >(tee "$1") 2>&1
export PYTHONUNBUFFERED=1
failed=()

step() {  # step SECONDS NAME COMMAND...: runs COMMAND under a time limit and reports how it ended
  local limit=$1 name=$2 began=$SECONDS rc=0
  shift 2
  echo; echo "=== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  echo "=== $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - began)) s"
  [ $rc -eq 0 ] || failed+=("$name")
}

echo "=== machine"; uptime; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, \
torch.cuda.get_device_name(0))" || exit 3

step 150 "exactness tests on CUDA (fp32, no TF32)" env FINEXTRACT_DEVICE=cuda-fp32 "$PY" -m pytest -q -p no:cacheprovider \
  tests/host/test_guidance_one_step.py tests/host/test_guider_lora_paths.py tests/host/test_guider_cfg_patches.py
step 130 "guidance, SD 1.5 size, fp16, 512 px" env FINEXTRACT_DEVICE=cuda "$PY" -m benchmarks.bench_guidance \
  --size sd15 --dtype fp16 --latent 64 --batch 4 --steps 10 --repeats 1 --floor --threads 4
step 200 "guidance, SDXL size, fp16, 1024 px" env FINEXTRACT_DEVICE=cuda "$PY" -m benchmarks.bench_guidance \
  --size sdxl --dtype fp16 --latent 128 --batch 2 --steps 6 --repeats 1 --floor --threads 4
step 60 "candidate bank, batch 8" env FINEXTRACT_DEVICE=cuda "$PY" -m benchmarks.bench_bank --counts 500 \
  --overhead-candidates 16 --batch 8 --steps 4
step 40 "SSCD throughput" "$PY" -m benchmarks.bench_sscd --device cuda --images 256 --batch 32
echo; uptime
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
echo "all GPU checks ran"
