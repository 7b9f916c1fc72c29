#!/usr/bin/env bash
# Every GPU check and benchmark of the repository in one command, for a machine with an NVIDIA
# GPU, nvcc and a CUDA build of torch (one lease of a GPU machine is usually minutes: use it whole).
#
#   bench/gpu_all.sh OUTDIR [STAGE ...]
#
# Stages (the default runs info kernels build tests scan train sweep sanitize, in that order;
# sass and profile only when named):
#   info     nvidia-smi, torch, nvcc
#   kernels  the raw CUDA kernels against a float64 host reference, every tile, outputs
#            poisoned (trainer/scan/csrc/scan_kernels_check.cu), built for SCAN_ARCH (default: this
#            GPU's compute capability). SCAN_CHECK=path: a prebuilt binary
#   sanitize compute-sanitizer's racecheck and memcheck over that program (after `kernels`)
#   build    the JIT build of the CUDA scan extension, timed
#   tests    pytest -m gpu over tests/trainer: scan op, models, bf16 training on the GPU
#   scan     bench/scan.py (every implementation; SCAN_IMPLS to choose), JSON to OUTDIR/scan.jsonl
#   sweep    bench/scan.py --sweep (every kernel tile at T = 4096)
#   sass     the built extension's scan kernels disassembled, to OUTDIR/scan.sass
#   profile  Nsight Compute over one forward and one backward launch per dtype (bench/scan_profile.py)
#   train    bench/train.py (the ~117M-parameter "125M" bidirectional Hawk, L = 2048; TRAIN_ARGS adds flags), JSON to
#            OUTDIR/train.jsonl
#
# Each stage runs under a time limit (STAGE_LIMIT_S, default 300 s) and logs to OUTDIR/STAGE.log;
# a failing stage does not stop the next. The last lines printed are a one-line-per-stage summary.
set -u
out=${1:?usage: bench/gpu_all.sh OUTDIR [STAGE ...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info kernels build tests scan train sweep sanitize)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
limit=${STAGE_LIMIT_S:-300}
summary=()

stage() {  # stage NAME COMMAND...
  local name=$1 started rc
  shift
  echo "=== $name: $*"
  started=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$*" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  summary+=("$(printf '%-8s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - started ))")")
}

for s in "${stages[@]}"; do
  case $s in
    info) stage info "nvidia-smi; nvcc --version | tail -2; $python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'" ;;
    kernels)
      check=${SCAN_CHECK:-/tmp/scan_check}
      arch=${SCAN_ARCH:-sm_$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
      [ -n "${SCAN_CHECK:-}" ] || build="nvcc -std=c++17 -O2 -arch=$arch -lineinfo -o $check trainer/scan/csrc/scan_kernels_check.cu && "
      stage kernels "${build:-}$check" ;;
    sanitize)
      check=${SCAN_CHECK:-/tmp/scan_check}
      stage sanitize "compute-sanitizer --tool racecheck --print-limit 20 $check | tail -4 && compute-sanitizer --tool memcheck --print-limit 20 $check | tail -4" ;;
    build) stage build "$python -c 'import time; t = time.time(); from trainer.scan.extension import cuda_backend; cuda_backend(); print(f\"CUDA extension ready in {time.time() - t:.1f} s\")'" ;;
    tests) stage tests "$python -m pytest -m gpu -q -p no:cacheprovider -o addopts= ${GPU_TESTS:-tests/trainer}" ;;
    scan) stage scan "$python bench/scan.py --impls ${SCAN_IMPLS:-ours associative reference accelerated} --json $out/scan.jsonl" ;;
    sweep) stage sweep "$python bench/scan.py --sweep --budget ${SWEEP_BUDGET_S:-0.5} ${SWEEP_ARGS:-}" ;;
    sass) stage sass "cuobjdump -sass \$(find \${TORCH_EXTENSIONS_DIR:-\$HOME/.cache/birdie/ext} -name 'birdie_scan_cuda*.so' | head -1) > $out/scan.sass; grep -c LDG $out/scan.sass" ;;
    profile) stage profile "ncu -k regex:linear_scan --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis $python bench/scan_profile.py" ;;
    train) stage train "$python bench/train.py --json $out/train.jsonl ${TRAIN_ARGS:-}" ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
