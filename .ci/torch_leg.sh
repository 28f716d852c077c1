#!/usr/bin/env bash
# One leg of CI's torch version matrix: a fresh venv with torch==VERSION from PyPI, prg_fast built
# against it (pip install --no-build-isolation -e . in a fresh copy of the checkout), then pytest.
#
#   bash .ci/torch_leg.sh VERSION [--extras] [PYTEST ARGS...]  # default: the engine's tests (.ci/engine_tests)
#
# --extras also installs the optional third-party networks the exactness tests use (diffusers, peft,
# torchode, torchdyn, torchcfm); without them those tests skip with the reason.
#
# PyPI's Linux torch wheels are CUDA builds: torch imports only beside the nvidia-* libraries its
# own libraries link (cuDNN, cuBLAS, NCCL, ... ~3 GB unpacked), even on a machine without a GPU. So
# every leg installs torch as a user gets it, with all its dependencies, through uv: the first run
# downloads each version once (~1 min each here), and every later venv hard-links the unpacked
# files from uv's cache (~2 s, no extra disk). uv comes from PyPI (.ci/run installs it); pip's
# constraint file (/etc/xdg/pip on the developers' machines caps torch at 2.14.1) does not apply.
#
# Knobs (environment): UV (the uv binary, default `uv` on the PATH), PRG_FAST_CI_WORK (scratch
# folder, default ${TMPDIR:-/tmp}/prg_fast-ci; the leg's folder is removed when it passes),
# PRG_FAST_CI_KEEP=1 keeps it.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: bash .ci/torch_leg.sh VERSION [--extras] [PYTEST ARGS...]" >&2; exit 2; }
VERSION=$1; shift
EXTRAS=0
if [ "${1:-}" = --extras ]; then EXTRAS=1; shift; fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UV=${UV:-uv}
WORK=${PRG_FAST_CI_WORK:-${TMPDIR:-/tmp}/prg_fast-ci}/torch-$VERSION
VENV=$WORK/venv
SRC=$WORK/src
if [ $# -eq 0 ]; then
  # the engine's test files, one a line (comments after #)
  mapfile -t FILES < <(sed 's/#.*//; /^\s*$/d' "$REPO/.ci/engine_tests")
  set -- "${FILES[@]/#/python_tests/}"
fi

START=$(date +%s)
mark() { echo "[torch $VERSION] [$(($(date +%s) - START))s] $*"; }

rm -rf "$WORK"
mkdir -p "$WORK"
"$UV" venv -q -p python3 "$VENV"
mark "installing torch==$VERSION with its dependencies (uv; cached after the first run)"
"$UV" pip install -q -p "$VENV/bin/python" "torch==$VERSION" numpy ninja pybind11 setuptools wheel
if [ "$EXTRAS" = 1 ]; then
  mark "the optional third-party networks (their tests skip without them)"
  # torchdiffeq: torchdyn imports it (through torchcde); the test extra would bring it only later
  "$UV" pip install -q -p "$VENV/bin/python" "torch==$VERSION" diffusers peft torchode torchdiffeq
  # torchdyn and torchcfm declare torchvision, jupyter and lightning's whole tree: their import-time needs only
  "$UV" pip install -q -p "$VENV/bin/python" --no-deps torchdyn torchcfm pot torchcde torchsde trampoline \
    pytorch_lightning lightning_utilities torchmetrics attrs
  "$VENV/bin/python" -c "import diffusers, peft, torchode, torchdyn.core, torchcfm.models.unet"
fi
INSTALL_S=$(($(date +%s) - START))
"$VENV/bin/python" -c "import torch; print('[torch $VERSION] imported torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"

# a fresh copy of the tracked (and new, not ignored) files: no build output of another torch
mkdir -p "$SRC"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$SRC")

mark "building prg_fast against it (pip install --no-build-isolation -e '.[test]', by uv)"
T0=$(date +%s)
(cd "$SRC" && PRG_FAST_CUDA=0 "$UV" pip install -q -p "$VENV/bin/python" --no-build-isolation -e ".[test]")
BUILD_S=$(($(date +%s) - T0))
(cd "$SRC" && "$VENV/bin/python" -c "import torch, prg_fast._C; print('[torch $VERSION] prg_fast._C loads against torch', torch.__version__)")
"$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$VERSION', torch.__version__"

mark "pytest $*"
T0=$(date +%s)
RC=0
(cd "$SRC" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@") || RC=$?
TEST_S=$(($(date +%s) - T0))
DISK=$(du -sh "$VENV" | cut -f1)
mark "torch $VERSION: install ${INSTALL_S}s, build ${BUILD_S}s, tests ${TEST_S}s (exit $RC); venv $DISK (hard links into uv's cache: $("$UV" cache dir))"
if [ "$RC" = 0 ] && [ "${PRG_FAST_CI_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
exit "$RC"
