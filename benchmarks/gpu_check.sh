#!/usr/bin/env bash
# One-command GPU check of fastkd: install without network, run the GPU tests, benchmark a reduced
# shape set, and write everything under OUTDIR. Budget: 6 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# The GPU image has torch, triton, pytest and numpy. Everything else travels as wheels in
# benchmarks/wheels/ (git-ignored, ~27 MB), fetched once on a machine with network:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d benchmarks/wheels \
#     liger-kernel trl matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing \
#     python-dateutil six packaging tzdata tqdm pytest-benchmark py-cpuinfo2 hypothesis \
#     sortedcontainers
#
# With the device tool: carry ["benchmarks/wheels"], command `bash benchmarks/gpu_check.sh $OUT`.
# Only wheels whose distribution the image lacks are installed, into a private folder put first
# on PYTHONPATH (the image's own packages are never replaced); fastkd itself is built from this
# checkout with `pip install --no-index --no-deps --no-build-isolation`.
#
# FASTKD_CHECK_DRY_RUN=1 runs the same steps on a machine without a GPU (tiny CPU shapes), to
# check the script itself.

set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS="$REPO/benchmarks/wheels"
PY=${PYTHON:-python3}
SITE=${FASTKD_CHECK_SITE:-/tmp/fastkd-gpu-check-site}
# Run Python from a neutral folder: from the checkout, ./fastkd (without kernels/) would shadow
# the installed package.
WORK=$(mktemp -d /tmp/fastkd-gpu-check.XXXXXX)
DRY_RUN=${FASTKD_CHECK_DRY_RUN:-0}
# Line-by-line logs, so a run cut short by its timeout still shows how far it got.
export PYTHONUNBUFFERED=1
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
status=0

say() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# --- 1. Private site folder with the wheels the image lacks ------------------------------------
rm -rf "$SITE"
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
say "installing missing wheels from $WHEELS into $SITE"
shopt -s nullglob
for wheel in "$WHEELS"/*.whl; do
  dist=$(basename "$wheel" | cut -d- -f1)
  if "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
    continue
  fi
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" \
      >>"$LOG" 2>&1; then
    say "  installed $(basename "$wheel")"
  else
    say "  could not install $(basename "$wheel") (wrong Python version?); continuing without it"
  fi
done

say "installing fastkd from $REPO"
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$REPO" \
    >>"$LOG" 2>&1; then
  say "FAILED to install fastkd (see $LOG)"
  exit 1
fi

# --- 2. Versions -------------------------------------------------------------------------------
(cd "$WORK" && "$PY" - <<'EOF') | tee "$OUTDIR/versions.txt" | tee -a "$LOG"
import importlib.metadata as md
import platform
import subprocess

import torch

def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"

print("python", platform.python_version())
for dist in ("torch", "triton", "liger-kernel", "fastkd", "numpy", "pytest", "matplotlib",
             "tqdm", "pytest-benchmark", "hypothesis"):
    print(dist, version(dist))
print("cuda (torch build)", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    print("nvidia-smi", smi.stdout.strip() or smi.stderr.strip())
except (OSError, subprocess.SubprocessError) as exc:
    print("nvidia-smi unavailable:", exc)
import fastkd
print("fastkd imported from", fastkd.__file__)
EOF

if [[ "$DRY_RUN" != 1 ]] && ! (cd "$WORK" && "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'); then
  say "no CUDA device visible: this check needs a GPU (FASTKD_CHECK_DRY_RUN=1 to test the script)"
  exit 1
fi

# --- 3. GPU tests ------------------------------------------------------------------------------
if [[ -f "$REPO/tests/test_gpu.py" ]]; then
  say "running tests/test_gpu.py"
  (cd "$WORK" && timeout 110 "$PY" -m pytest -q -p no:cacheprovider -c "$REPO/pytest.ini" \
      --rootdir "$REPO" "$REPO/tests/test_gpu.py" --junitxml="$OUTDIR/test_gpu.xml") 2>&1 \
    | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "tests/test_gpu.py exit status $rc"
  [[ $rc -eq 0 ]] || status=1
else
  say "tests/test_gpu.py is missing: no GPU tests run"
  status=1
fi

# --- 4. Benchmark on the reduced GPU shape set -------------------------------------------------
if [[ "$DRY_RUN" == 1 ]]; then
  bench_args=(--device cpu --shapes tiny --providers fastkd eager liger)
else
  # Dynamic-shape torch.compile: one compile per dtype and mode instead of one per case keeps
  # the benchmark inside its 200 s on a fresh machine with a cold compile cache.
  bench_args=(--device cuda --shapes gpu-quick --gpu-rep-ms 50 --compile-dynamic on)
fi
say "benchmark: fastkd-bench ${bench_args[*]}"
(cd "$WORK" && timeout 200 "$PY" -m fastkd.bench "${bench_args[@]}" --no-progress \
    --out-dir "$OUTDIR/bench") 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "benchmark exit status $rc"
[[ $rc -eq 0 ]] || status=1

# --- 4b. Fused linear against explicit logits, the 4 GEMMs, TRL and Liger (N=8192) ----------
if [[ "$DRY_RUN" == 1 ]]; then
  linear_args=(--device cpu --linear --linear-shapes linear-tiny)
else
  linear_args=(--device cuda --linear --linear-shapes linear-gpu-quick)
fi
say "fused linear: fastkd-bench ${linear_args[*]}"
(cd "$WORK" && timeout 150 "$PY" -m fastkd.bench "${linear_args[@]}" --no-progress \
    --out-dir "$OUTDIR/linear") 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "fused linear exit status $rc"
[[ $rc -eq 0 ]] || status=1

# --- 5. Long rows: each FASTKD_LONG_ROWS strategy, checked, timed, and the selection table -----
lr_args=(--out "$OUTDIR/long_rows")
[[ "$DRY_RUN" == 1 ]] && lr_args+=(--dry-run)
say "long-row decision kit: python -m fastkd.bench.long_rows ${lr_args[*]}"
(cd "$WORK" && timeout 180 "$PY" -m fastkd.bench.long_rows "${lr_args[@]}") 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "long-row decision kit exit status $rc"
[[ $rc -eq 0 ]] || status=1

# --- 6. Static counts of the kernels as this machine's Triton compiles them --------------------
say "static report of the kernels this Triton builds"
(cd "$WORK" && timeout 90 "$PY" -m fastkd.bench --static --json "$OUTDIR/static.json") \
  >>"$LOG" 2>&1 || say "static report failed or timed out (see $LOG)"

# --- 7. DRAM bytes per launch with Nsight Compute, where it runs -----------------------------
if [[ "$DRY_RUN" != 1 ]] && command -v ncu >/dev/null; then
  say "ncu probe"
  if timeout 30 ncu --version >>"$LOG" 2>&1; then
    for vocab in 32000 151936; do
      (cd "$WORK" && timeout 60 ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum,\
lts__t_sector_hit_rate.pct -k regex:_kd_loss_fwd_kernel --launch-count 1 "$PY" -c "
import torch, fastkd
s = torch.randn(4096, $vocab, device='cuda', dtype=torch.bfloat16, requires_grad=True)
t = torch.randn(4096, $vocab, device='cuda', dtype=torch.bfloat16)
y = torch.randint(0, $vocab, (4096,), device='cuda')
fastkd.kd_loss(s, t, y, temperature=2.0)
torch.cuda.synchronize()") >"$OUTDIR/ncu_$vocab.txt" 2>&1 || say "ncu failed for V=$vocab"
    done
  else
    say "ncu does not run here (see $LOG)"
  fi
fi

rm -rf "$WORK"
say "done in ${SECONDS}s, status $status; results under $OUTDIR"
exit $status
