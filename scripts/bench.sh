#!/usr/bin/env bash
# Install fastkd with its benchmark extras into a virtual environment and run fastkd-bench, which
# picks shapes that fit this machine (GPU shapes on CUDA, CPU shapes otherwise) and writes its
# results under ./results/<device>/. Extra arguments go to fastkd-bench.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_venv.sh" bench
exec "${FASTKD_VENV:-$root/.venv}/bin/fastkd-bench" "$@"
