#!/usr/bin/env bash
# The one GPU check: GPU tests, the kernel bandwidth bench and the GPU throughput regimes.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# For a machine with torch and triton preinstalled and NO package registry. It
#   1. installs the project without dependencies (pip install --no-deps --no-build-isolation -e .),
#      or, if that fails, puts a shadow package on PYTHONPATH (bespoke_fast + the kernels/ folder
#      as bespoke_fast.kernels, the layout setup.py declares),
#   2. sets BESPOKE_FAST_GPU_TESTS=1 (the root conftest.py then leaves TRITON_INTERPRET unset:
#      kernels compile for the GPU) and runs `pytest -m gpu tests` (pytest.ini adds -q),
#   3. runs bench/bench_kernels.py and bench/throughput.py (launch + compute regimes),
#   4. renders OUT_DIR/summary.md (bench/render.py).
# Each step has its own time cap (`timeout`); a step that fails or times out is recorded in
# OUT_DIR/status.txt and the script goes on. Worst case ~7 min (the caps below add up to 410 s,
# plus a few seconds of setup), typically less on an H100. Peers that are not installed (torchdiffeq, flow_matching, diffusers) are
# skipped with a note by the scripts. Nothing here changes GPU clocks or any device setting.
set -u
OUT="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"
STATUS="$OUT/status.txt"
: > "$STATUS"
T0=$(date +%s)

# caps (seconds); override with env vars for a longer or shorter check
CAP_TESTS="${CAP_TESTS:-130}"
CAP_KERNELS="${CAP_KERNELS:-100}"
CAP_THROUGHPUT="${CAP_THROUGHPUT:-180}"

step() {  # step NAME CAP LOGFILE CMD...: run with a time cap, tee output, record the outcome
  local name="$1" cap="$2" log="$3"; shift 3
  local s=$(date +%s)
  echo "== $name (cap ${cap}s): $*" | tee -a "$log"
  timeout --kill-after=15 "$cap" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local d=$(( $(date +%s) - s ))
  local what="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what="TIMED OUT"; elif [ "$rc" -ne 0 ]; then what="FAILED"; fi
  printf '%-12s %-9s rc=%-3s %4ss  (%s)\n' "$name" "$what" "$rc" "$d" "$*" >> "$STATUS"
  return 0
}

# ---- environment (no hostname)
{
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | head -5
  "$PY" - <<'EOF' 2>&1
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}")
for name in ("triton", "pynvml", "torchdiffeq", "flow_matching", "diffusers", "matplotlib", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'installed')}")
    except Exception as e:
        print(f"{name}: NOT AVAILABLE ({type(e).__name__})")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- install without dependencies, or fall back to a shadow package on PYTHONPATH
if [ "${SKIP_INSTALL:-0}" = "1" ]; then
  echo "install      skipped   SKIP_INSTALL=1 (using the current environment)" >> "$STATUS"
elif "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
   && (cd /tmp && "$PY" -c "import bespoke_fast.kernels, bespoke_fast.engine") >> "$OUT/install.log" 2>&1; then
  echo "install      ok        pip install --no-deps --no-build-isolation -e ." >> "$STATUS"
else
  SHADOW="$(mktemp -d)"
  mkdir -p "$SHADOW/bespoke_fast"
  for f in "$REPO"/bespoke_fast/* "$REPO"/bespoke_fast/.[!.]*; do
    [ -e "$f" ] && ln -s "$f" "$SHADOW/bespoke_fast/$(basename "$f")"
  done
  [ -e "$SHADOW/bespoke_fast/kernels" ] || ln -s "$REPO/kernels" "$SHADOW/bespoke_fast/kernels"
  export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
  echo "install      fallback  pip failed (see install.log); PYTHONPATH shadow package $SHADOW" >> "$STATUS"
fi

export BESPOKE_FAST_GPU_TESTS=1
unset TRITON_INTERPRET

# ---- 1. GPU tests
if "$PY" -c "import pytest" 2>/dev/null; then
  step gpu-tests "$CAP_TESTS" "$OUT/pytest_gpu.txt" \
    "$PY" -m pytest -m gpu tests -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
else
  echo "gpu-tests    SKIPPED   pytest not installed" >> "$STATUS"
fi

# ---- 2. kernel bandwidth
step kernels "$CAP_KERNELS" "$OUT/kernels.log" \
  "$PY" bench/bench_kernels.py --out "$OUT"

# ---- 3. throughput (GPU regimes); it stops starting rows 25 s before its cap and writes as it goes
step throughput "$CAP_THROUGHPUT" "$OUT/throughput.log" \
  "$PY" bench/throughput.py --regimes launch compute --out "$OUT" --telemetry-seconds 0.5 \
  --time-budget $(( CAP_THROUGHPUT - 25 ))

# ---- 4. summary
echo "total        $(( $(date +%s) - T0 ))s" >> "$STATUS"
"$PY" bench/render.py "$OUT" > /dev/null 2>&1 || echo "render failed" >> "$STATUS"
cat "$STATUS"
echo "summary: $OUT/summary.md"
