#!/usr/bin/env bash
# Prove that the CUDA sources (csrc/cuda/) compile, on a machine without a GPU.
#
#   bash .ci/build_cuda.sh
#
# Uses (creating it on first use) a virtual environment with the CUDA build of torch, copies the
# repository's files into a temporary directory, builds prg_fast._C_cuda there for sm_90
# (H100/H200) and checks the result: the shared library exists, exports PyInit__C_cuda, holds
# sm_90 machine code, and registers a CUDA kernel for prg_fast::stage_combine when imported. No
# build output touches the checkout. Exits non-zero on any failure.
#
# Knobs (environment):
#   PRG_FAST_CUDA_VENV   the venv (default ~/.cache/prg_fast-ci/cuda-venv); reused when it already
#                        has torch 2.14.1
#   CUDA_HOME            the CUDA toolkit root, the folder whose lib64/ holds libcudart.so
#                        (default /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST default "9.0"
#   MAX_JOBS             parallel compile jobs (default 2)
#   PRG_FAST_KEEP_BUILD=1  keep the temporary build directory (its path is printed)
set -euo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PRG_FAST_CUDA_VENV:-$HOME/.cache/prg_fast-ci/cuda-venv}
TORCH_VERSION=2.14.1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export PRG_FAST_CUDA=1

log() { echo "[build_cuda] $*"; }
elapsed() { echo $(($(date +%s) - START)); }

# --- toolkit ----------------------------------------------------------------------------------
if [ ! -e "$CUDA_HOME/lib64/libcudart.so" ] && [ ! -e "$CUDA_HOME/lib64/libcudart.so.13" ]; then
  echo "[build_cuda] error: CUDA_HOME=$CUDA_HOME is not a CUDA toolkit root (no lib64/libcudart.so)" >&2
  exit 1
fi
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "[build_cuda] error: no nvcc at $CUDA_HOME/bin/nvcc" >&2
  exit 1
fi
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"

# --- venv with the CUDA build of torch ---------------------------------------------------------
venv_ok() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
import torch
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert torch.version.cuda is not None, "CPU-only torch"
import ninja, pybind11, setuptools, wheel, numpy  # noqa: F401,E401
EOF
}
if venv_ok; then
  log "reusing venv $VENV"
else
  log "creating venv $VENV (torch==$TORCH_VERSION, CUDA build; several GB)"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" ninja pybind11 setuptools wheel numpy
  venv_ok || { echo "[build_cuda] error: venv $VENV still lacks torch $TORCH_VERSION with CUDA" >&2; exit 1; }
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"  # ninja from the venv, nvcc from the toolkit
log "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# --- copy the sources (tracked files plus new, not ignored ones) ------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/prg_fast-cuda-build.XXXXXX")
if [ "${PRG_FAST_KEEP_BUILD:-0}" = "1" ]; then
  log "keeping build directory $TMP"
else
  trap 'rm -rf "$TMP"' EXIT
fi
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$TMP")
else  # not a git checkout: copy everything but build outputs
  (cd "$REPO" && tar --exclude=./build --exclude='*.so' --exclude='*.egg-info' --exclude=.git \
    --exclude=__pycache__ -cf - .) | (cd "$TMP" && tar -xf -)
fi
log "copied sources to $TMP"

# --- build -------------------------------------------------------------------------------------
BUILD_START=$(date +%s)
log "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, CUDA_HOME=$CUDA_HOME)"
(cd "$TMP" && "$PY" setup.py build_ext --inplace) > "$TMP/build.log" 2>&1 || {
  tail -n 150 "$TMP/build.log" >&2
  echo "[build_cuda] error: build failed after $(elapsed) s" >&2
  exit 1
}
grep -E "prg_fast: |warning" "$TMP/build.log" | grep -v "^\s*$" | head -n 40 || true
log "compile took $(($(date +%s) - BUILD_START)) s"

# --- checks ------------------------------------------------------------------------------------
SO=$(ls "$TMP"/prg_fast/_C_cuda*.so 2>/dev/null | head -n 1 || true)
if [ -z "$SO" ]; then
  echo "[build_cuda] error: no prg_fast/_C_cuda*.so was built" >&2
  tail -n 50 "$TMP/build.log" >&2
  exit 1
fi
log "built $(basename "$SO") ($(du -h "$SO" | cut -f1))"

# (grep without -q: reading all of nm's output avoids a SIGPIPE that pipefail would report)
if ! nm -D --defined-only "$SO" | grep " PyInit__C_cuda$" >/dev/null; then
  echo "[build_cuda] error: $SO does not export PyInit__C_cuda" >&2
  exit 1
fi
log "exports PyInit__C_cuda"

# Which GPU architectures the library carries machine code (cubins) for: cuobjdump when there is
# one, else the fatbinary's entry headers read directly (magic 0xBA55ED50; each entry: kind 1 = PTX,
# 2 = ELF cubin, with the SM version as a 32-bit field at byte 28 of the entry header).
CUOBJDUMP=$(command -v cuobjdump || true)
[ -z "$CUOBJDUMP" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ -n "$CUOBJDUMP" ]; then
  ARCHS=$("$CUOBJDUMP" --list-elf "$SO" | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ')
  log "cuobjdump --list-elf: $ARCHS"
else
  ARCHS=$("$PY" - "$SO" <<'EOF'
import struct
import sys

data = open(sys.argv[1], "rb").read()
magic = struct.pack("<I", 0xBA55ED50)
archs = set()
pos = data.find(magic)
while pos >= 0:
    _, version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
    off, end = pos + header_size, pos + header_size + fat_size
    while version == 1 and off + 32 <= min(end, len(data)):
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
        (sm,) = struct.unpack_from("<I", data, off + 28)
        if kind == 2:
            archs.add(f"sm_{sm}")
        if entry_header == 0:
            break
        off += entry_header + payload
    pos = data.find(magic, pos + 4)
print(" ".join(sorted(archs)))
EOF
)
  log "cubins in the fatbinary (no cuobjdump here): $ARCHS"
fi
for arch in $(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' ' | tr -d '.' | sed 's/+PTX//g'); do
  case " $ARCHS " in
    *" sm_$arch "*) ;;
    *) echo "[build_cuda] error: no sm_$arch code in $SO (found: $ARCHS)" >&2; exit 1 ;;
  esac
done

# The library loads (no missing symbols) and registers the CUDA kernel; no GPU needed for that.
(cd "$TMP" && "$PY" - <<'EOF')
import torch
import prg_fast._C  # noqa: F401  (the schemas)
import prg_fast._C_cuda  # noqa: F401  (the CUDA kernels)
ok = torch._C._dispatch_has_kernel_for_dispatch_key("prg_fast::stage_combine", "CUDA")
assert ok, "prg_fast::stage_combine has no CUDA kernel after importing prg_fast._C_cuda"
ok = torch._C._dispatch_has_kernel_for_dispatch_key("prg_fast::stage_combine_rows", "CUDA")
assert ok, "prg_fast::stage_combine_rows has no CUDA kernel after importing prg_fast._C_cuda"
ok = torch._C._dispatch_has_kernel_for_dispatch_key("prg_fast::stage_combine_into", "CUDA")
assert ok, "prg_fast::stage_combine_into has no CUDA kernel after importing prg_fast._C_cuda"
print("[build_cuda] prg_fast._C_cuda imports and registers prg_fast::stage_combine(_into, _rows) for CUDA")
EOF

log "OK: CUDA extension built and checked in $(elapsed) s"
