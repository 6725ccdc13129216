#!/usr/bin/env bash
# The one GPU check: GPU tests, the kernel bandwidth bench and the GPU throughput regimes.
#
#   bash bench/gpu_check.sh OUT_DIR              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run OUT_DIR    # on any CPU machine: same stages, toy sizes
#
# For a machine with torch and triton preinstalled (+ numpy, safetensors, pytest) and NO
# package registry. It
#   1. installs the project without dependencies (pip install --no-deps --no-build-isolation -e .),
#      or, if that fails, puts a shadow package on PYTHONPATH (bespoke_fast + the
#      kernels/bespoke_fast_kernels/ folder as bespoke_fast.kernels, the layout setup.py declares),
#   2. sets BESPOKE_FAST_GPU_TESTS=1 (the root conftest.py then leaves TRITON_INTERPRET unset:
#      kernels compile for the GPU; a triton that does not import FAILS the run) and runs
#      `pytest -m gpu tests` (pytest.ini adds -q),
#   3. runs bench/bench_kernels.py (inputs generated on the device; results rewritten after
#      every point) and bench/throughput.py (launch + compute regimes, torch.compile rows after
#      both; rewritten after every row),
#   4. renders summary.md (bench/render.py).
# Each stage has its own time cap (`timeout`, killed KILL_AFTER s later at worst); the plan
# printed first adds the worst case up (install + caps + kills) and must stay <= 7 min. Each
# stage writes its results as it goes, so a cap loses only unfinished rows. A stage that fails
# or times out is recorded in status.txt and the script goes on. Peers that are not installed
# (torchdiffeq, flow_matching, diffusers) are skipped with a note by the scripts. Nothing here
# changes GPU clocks or any device setting.
#
# OUT_DIR receives three files (a GPU machine returns at most 8): gpu_check.tgz (every output:
# env, plan, install log, pytest log + junit xml, kernels.json/.md, throughput.json/.md,
# summary.md, status.txt), summary.md and status.txt. The stages work in a scratch folder.
# The last thing printed is a one-screen summary.
#
# --dry-run: the same stages and files on CPU at toy sizes (CI runs it, < 3 min): the install
# stage takes the shadow-package path (no pip), the GPU tests skip (no CUDA), the kernel bench
# runs the kernels through the Triton interpreter at 64 KB, the throughput bench runs its CPU
# regime quickly (and notes the skipped GPU regimes).
set -u
# the interpreter: $PYTHON, else python, else python3 (GPU images often have only python3);
# a relative path is made absolute (stages run from other dirs)
if [ -n "${PYTHON:-}" ]; then PY_GIVEN="$PYTHON"
elif command -v python > /dev/null 2>&1; then PY_GIVEN=python
else PY_GIVEN=python3; fi
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
DEST="$(cd "$OUT" && pwd)"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # scratch: packed into DEST at the end
case "$PY_GIVEN" in */*) PY_GIVEN="$(cd "$(dirname "$PY_GIVEN")" && pwd)/$(basename "$PY_GIVEN")";; esac
cd "$REPO"
RUN_DIR="$REPO"  # where the GPU tests run from (the shadow mirror when pip cannot install)
PY="$PY_GIVEN"
STATUS="$OUT/status.txt"
: > "$STATUS"
T0=$(date +%s)

# caps (seconds); override with env vars for a longer or shorter check. A stage still running
# at its cap gets SIGTERM, then SIGKILL KILL_AFTER s later: its worst case is cap + KILL_AFTER.
CAP_INSTALL="${CAP_INSTALL:-30}"
CAP_TESTS="${CAP_TESTS:-80}"
CAP_KERNELS="${CAP_KERNELS:-80}"
CAP_THROUGHPUT="${CAP_THROUGHPUT:-150}"
CAP_RENDER="${CAP_RENDER:-10}"
KILL_AFTER="${KILL_AFTER:-10}"
if [ "$DRY" = "1" ]; then
  # a CPU machine, maybe a loaded CI runner, is slower at toy sizes than the GPU machine at
  # full size: 4x the caps (the dry run takes what it needs, under 3 min on an idle 2-core VM)
  CAP_INSTALL=$(( CAP_INSTALL * 4 )); CAP_TESTS=$(( CAP_TESTS * 4 )); CAP_KERNELS=$(( CAP_KERNELS * 4 ))
  CAP_THROUGHPUT=$(( CAP_THROUGHPUT * 4 )); CAP_RENDER=$(( CAP_RENDER * 4 ))
fi
if [ "$DRY" = "1" ]; then
  # toy sizes on CPU: the same code paths and files, in well under 3 minutes
  KERNEL_ARGS=(--sizes-mb 0.0625 --warmup 1 --reps 2 --cpu-kernels)
  THROUGHPUT_ARGS=(--regimes launch compute cpu --quick --reps 2 --telemetry-seconds 0.1)
else
  # sizes that fit the caps on an H200 (kernels: 84 points, <= 1 GB states, ~1 min measured
  # by the byte counts; throughput: the launch + compute regimes, ~2-3 min)
  KERNEL_ARGS=(--sizes-mb 1 4 16 64 256 1024)
  THROUGHPUT_ARGS=(--regimes launch compute --telemetry-seconds 0.5)
fi
TOTAL_CAP=$(( CAP_INSTALL + CAP_TESTS + CAP_KERNELS + CAP_THROUGHPUT + CAP_RENDER ))
WORST=$(( TOTAL_CAP + 5 * KILL_AFTER ))
{
  echo "time plan: install ${CAP_INSTALL}s + gpu-tests ${CAP_TESTS}s + kernels ${CAP_KERNELS}s + throughput ${CAP_THROUGHPUT}s + render ${CAP_RENDER}s = ${TOTAL_CAP}s of caps$([ "$DRY" = 1 ] && echo ' (dry run on CPU)')"
  echo "worst case: ${TOTAL_CAP}s of caps + 5 x ${KILL_AFTER}s to kill a stage that overruns = ${WORST}s ($(( WORST / 60 )) min $(( WORST % 60 )) s; the budget is 420 s)"
  if [ "$DRY" = "0" ] && [ "$WORST" -gt 420 ]; then echo "warning: the worst case is over 7 minutes"; fi
} | tee "$OUT/plan.txt"

step() {  # step NAME CAP LOGFILE CMD...: run with a time cap, tee output, record the outcome
  local name="$1" cap="$2" log="$3"; shift 3
  local s=$(date +%s)
  echo "== $name (cap ${cap}s): $*" | tee -a "$log"
  timeout --kill-after="$KILL_AFTER" "$cap" "$@" 2>&1 | tee -a "$log"
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
  echo "interpreter: $PY ($(command -v "$PY"))"
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
elif [ "$DRY" = "0" ] && timeout --kill-after="$KILL_AFTER" "$CAP_INSTALL" \
     "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
   && (cd /tmp && "$PY" -c "import bespoke_fast.kernels, bespoke_fast.engine") >> "$OUT/install.log" 2>&1; then
  echo "install      ok        pip install --no-deps --no-build-isolation -e ." >> "$STATUS"
else
  # a mirror of the checkout in which bespoke_fast/ also holds kernels/bespoke_fast_kernels as
  # bespoke_fast/kernels (the layout setup.py declares): Python and pytest put the folder they
  # start in first on sys.path, so the GPU tests run from the mirror, the scripts see it
  # through PYTHONPATH
  SHADOW="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_shadow.XXXXXX")"
  for f in "$REPO"/* "$REPO"/.[!.]*; do
    case "$(basename "$f")" in bespoke_fast|.git) ;; *) [ -e "$f" ] && ln -s "$f" "$SHADOW/";; esac
  done
  mkdir -p "$SHADOW/bespoke_fast"
  for f in "$REPO"/bespoke_fast/* "$REPO"/bespoke_fast/.[!.]*; do
    [ -e "$f" ] && ln -s "$f" "$SHADOW/bespoke_fast/$(basename "$f")"
  done
  [ -e "$SHADOW/bespoke_fast/kernels" ] || ln -s "$REPO/kernels/bespoke_fast_kernels" "$SHADOW/bespoke_fast/kernels"
  export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
  RUN_DIR="$SHADOW"
  if [ "$DRY" = "1" ]; then
    echo "install      shadow    dry run: PYTHONPATH shadow package (the no-pip path)" >> "$STATUS"
  else
    echo "install      fallback  pip failed (see install.log); PYTHONPATH shadow package" >> "$STATUS"
  fi
  (cd /tmp && "$PY" -c "import bespoke_fast.kernels, bespoke_fast.engine") >> "$OUT/install.log" 2>&1 \
    || echo "install      FAILED    the shadow package does not import (see install.log)" >> "$STATUS"
fi

export BESPOKE_FAST_GPU_TESTS=1
unset TRITON_INTERPRET

# ---- 1. GPU tests
if "$PY" -c "import pytest" 2>/dev/null; then
  cd "$RUN_DIR"
  step gpu-tests "$CAP_TESTS" "$OUT/pytest_gpu.txt" \
    "$PY" -m pytest -m gpu tests -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
  cd "$REPO"
else
  echo "gpu-tests    SKIPPED   pytest not installed" >> "$STATUS"
fi

# ---- 2. kernel bandwidth (writes kernels.json / .md after every point)
step kernels "$CAP_KERNELS" "$OUT/kernels.log" \
  "$PY" bench/bench_kernels.py --out "$OUT" "${KERNEL_ARGS[@]}"

# ---- 3. throughput; it stops starting rows 25 s before its cap and writes as it goes
step throughput "$CAP_THROUGHPUT" "$OUT/throughput.log" \
  "$PY" bench/throughput.py --out "$OUT" "${THROUGHPUT_ARGS[@]}" \
  --time-budget $(( CAP_THROUGHPUT - 25 ))

# ---- 4. summary, packed results, and a one-screen report printed last
step render "$CAP_RENDER" "$OUT/render.log" "$PY" bench/render.py "$OUT"
echo "total        $(( $(date +%s) - T0 ))s" >> "$STATUS"
tar czf "$DEST/gpu_check.tgz" -C "$OUT" .
cp "$STATUS" "$DEST/status.txt"
[ -f "$OUT/summary.md" ] && cp "$OUT/summary.md" "$DEST/summary.md"
rm -rf "$OUT"
echo
echo "==================== gpu_check summary ($([ "$DRY" = 1 ] && echo 'dry run on CPU' || echo 'GPU run'))"
cat "$DEST/status.txt"
if [ -f "$DEST/summary.md" ]; then head -n 40 "$DEST/summary.md"; fi
echo "all outputs: $DEST/gpu_check.tgz (+ summary.md, status.txt)"
