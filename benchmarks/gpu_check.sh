#!/usr/bin/env bash
# The GPU proof in one command (issue 24): build the extension for sm_90 with every core, then run
# benchmarks/gpu_report.py under one global deadline, all within 8 minutes of wall time.
#
#   bash benchmarks/gpu_check.sh --out $OUT/gpu            # on the GPU machine (run timeout ~540 s)
#   bash benchmarks/gpu_check.sh --smoke --out DIR         # CPU, no build: the pipeline at tiny sizes (CI)
#   python benchmarks/gpu_results.py DIR/report.json       # then: RESULTS.md's GPU section from it
#
# Options:
#   --out DIR        output folder, at most 8 files (default benchmarks/out/gpu)
#   --deadline S     seconds for the report's parts after the build (default 420); lowered so that
#                    build + parts + writing stay within --wall
#   --wall S         the whole command's budget in seconds (default 480)
#   --no-build       use the extension already built in this checkout
#   --smoke          --no-build, and the report's CPU smoke mode
#   --cuda-set all   correctness runs every cuda-marked test instead of the quick subset
#   --only PART...   run these report parts only (a rerun: --no-build --wall 240 --only correctness)
# Needs nothing beyond the checkout: no network (pip runs with --no-index --no-deps), no ../shared.
set -uo pipefail

# the whole script is one function, parsed before it runs (an edit during a run cannot break it)
main() {
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  cd "$ROOT" || exit 2
  OUT=benchmarks/out/gpu
  DEADLINE=420
  WALL=480
  BUILD=1
  SMOKE=()
  ONLY=()
  CUDA_SET=quick
  BUILD_LIMIT=240  # a build still running then is stopped: the report runs anyway and says so
  MARGIN=15        # seconds kept for the report's last write and the interpreter's exit

  usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
  while [ $# -gt 0 ]; do
    case "$1" in
      --out) OUT=$2; shift 2 ;;
      --deadline) DEADLINE=$2; shift 2 ;;
      --wall) WALL=$2; shift 2 ;;
      --no-build) BUILD=0; shift ;;
      --smoke) BUILD=0; SMOKE=(--smoke); shift ;;
      --cuda-set) CUDA_SET=$2; shift 2 ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do ONLY+=("$1"); shift; done ;;
      -h|--help) usage; exit 0 ;;
      *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
  done
  for n in "$DEADLINE" "$WALL"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --deadline and --wall take whole seconds, got '$n'" >&2; exit 2; }
  done

  PY=${PYTHON:-python3}
  START=$(date +%s)
  mkdir -p "$OUT"
  rm -f "$OUT"/report.json "$OUT"/report.md "$OUT"/*.log "$OUT"/kernels.json
  export PYTHONUNBUFFERED=1

  # The CUDA toolkit root: the folder whose lib64/ (or lib/) holds libcudart.so, which the link needs.
  # torch guesses it from nvcc on the PATH, which can be a pip package without that library.
  find_cuda_home() {
    local nvcc candidates=() c
    nvcc=$(command -v nvcc || true)
    [ -n "$nvcc" ] && candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
    candidates+=(/usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12* /opt/cuda)
    for c in "${candidates[@]}"; do
      if [ -e "$c/lib64/libcudart.so" ] || [ -e "$c/lib/libcudart.so" ]; then echo "$c"; return; fi
    done
  }

  BUILD_ARGS=()
  if [ "$BUILD" = 1 ]; then
    export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    [ -z "${CUDA_HOME:-}" ] && CUDA_HOME=$(find_cuda_home) && [ -n "$CUDA_HOME" ] && export CUDA_HOME
    {
      echo "== build environment"
      echo "nvcc: $(command -v nvcc || echo 'not on PATH') $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1)"
      echo "CUDA_HOME: ${CUDA_HOME:-unset (torch guesses)}"
      "$PY" -c "import torch, torch.utils.cpp_extension as c; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'CUDA_HOME seen by torch:', c.CUDA_HOME)" 2>&1
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2
    } >"$OUT/build.log" 2>&1
    echo "== build: pip install -e . for arch $TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs, CUDA_HOME=${CUDA_HOME:-unset} (log: $OUT/build.log)"
    timeout "$BUILD_LIMIT" "$PY" -m pip install --no-build-isolation --no-index --no-deps -v -e . >>"$OUT/build.log" 2>&1
    RC=$?
    [ "$RC" = 124 ] && echo "== build: stopped at its $BUILD_LIMIT s limit" | tee -a "$OUT/build.log"
    if [ "$RC" != 0 ] && [ "$RC" != 124 ] && ! grep -q ninja "$OUT/build.log"; then
      # pip itself refused before compiling anything (not a compile error): build in place instead
      echo "== build: pip failed before compiling (exit $RC); setup.py build_ext --inplace" | tee -a "$OUT/build.log"
      LEFT_BUILD=$((BUILD_LIMIT - ($(date +%s) - START)))
      timeout "$((LEFT_BUILD > 10 ? LEFT_BUILD : 10))" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
      RC=$?
    fi
    BUILD_ARGS=(--build-rc "$RC" --build-seconds "$(($(date +%s) - START))")
    echo "== build: exit $RC after $(($(date +%s) - START)) s"
  fi

  LEFT=$((WALL - ($(date +%s) - START) - MARGIN))
  [ "$DEADLINE" -gt "$LEFT" ] && DEADLINE=$LEFT
  [ "$DEADLINE" -lt 0 ] && DEADLINE=0
  echo "== report: deadline $DEADLINE s (out: $OUT)"
  "$PY" benchmarks/gpu_report.py --out "$OUT" --deadline "$DEADLINE" --cuda-set "$CUDA_SET" \
    ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"} ${SMOKE[@]+"${SMOKE[@]}"} ${ONLY[@]+--only "${ONLY[@]}"}
  RC=$?
  echo "== gpu_check: done in $(($(date +%s) - START)) s (exit $RC); $OUT/report.md has the figures"
  return $RC
}

main "$@"
