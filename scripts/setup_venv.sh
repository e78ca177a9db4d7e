#!/usr/bin/env bash
# Make (or reuse) a virtual environment and install fastkd into it, non-editable, with the extras
# named in $1 (comma-separated). Prints nothing but pip's errors. The environment's location is
# $FASTKD_VENV, default .venv at the top of the checkout.
#
# torch is installed first and only when the environment has none: the pin below takes the CPU
# build of 2.13.0 where one lies on the machine's disk (as on fastkd's CI machines) instead of
# downloading the multi-GB CUDA build. On a GPU machine set FASTKD_TORCH_SPEC to the torch you
# want (e.g. FASTKD_TORCH_SPEC=torch) or install torch into the environment beforehand.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-test}
venv=${FASTKD_VENV:-$root/.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "${FASTKD_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
fi
# Non-editable on purpose: what gets tested is the installed package, as users get it.
"$py" -m pip install -q "$root[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
"$py" -m pip install -q --no-deps --force-reinstall "$root" 2>&1 | grep -v "^WARNING: Location" || true
"$py" -c "import fastkd, torch; print(f'fastkd {fastkd.__version__} installed in $venv (torch {torch.__version__})')"
