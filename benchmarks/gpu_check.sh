#!/usr/bin/env bash
# One prepared check on a GPU machine (docs/BENCHMARKS.md): GPU + kernel tests, the host time of
# one call, the large-vocabulary preset trained fused vs unfused, the cross-entropy benchmark
# (full sweep, budget what is left), then the linear cross-entropy benchmark; on request also the
# transformers integration's training-step memory (step "integ").
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, repo root, $OUT set
#   FUSEDCE_GPU_CHECK_DRY=1 OUT=/tmp/o bash benchmarks/gpu_check.sh   # CPU dry run: every step's
#                                                     # plumbing, at tiny sizes (no GPU numbers)
#
# Environment: FUSEDCE_GPU_CHECK_STEPS (default "tests,host,train,ce,lce"; also "tune" = a sweep
# of the kernel's launch configurations and "integ" = benchmarks/bench_integrations.py, peak
# memory of a Llama training step with and without fusedce.integrations.transformers.apply;
# FUSEDCE_INTEG_ARGS adds options to it; "vp" = benchmarks/bench_vocab_parallel.py, bytes and
# time of the vocabulary-parallel loss vs gathering the logits over NCCL, needs >= 2 GPUs and is
# skipped with a note otherwise, FUSEDCE_VP_ARGS adds options to it; "distill" =
# benchmarks/bench_distillation.py, the fused distillation head's time against
# linear_cross_entropy at 8192 x 4096 x 128256 bf16, k = 256; a rerun can name fewer),
# FUSEDCE_GPU_CHECK_TOTAL_S (default 510), FUSEDCE_GIT_COMMIT (recorded in the JSON where the copy on the device has no
# .git), PYTHON (default python3), FUSEDCE_BACKEND (default auto: the backend of the tests and of
# the benchmarks' fusedce columns).
#
# Installs nothing from the network: wheels in .whl/ (carried with the call) go to /tmp/site.
# Writes at most 8 files into $OUT: gpu_tests.log, gpu_check.log, <card>-<date>.{md,json,png},
# <card>-<date>-summary.json (the cross-entropy and linear runs as flat records), and the other
# steps' files (profile_host.log, train_compare.log, the linear, integration, vocab-parallel and
# distillation benchmarks' files: tarred into one if they would pass the limit).
# Every step runs under `timeout`; the whole script stays under ~9 minutes. Exit status: 0 when
# every step passed, else the number of failed steps.
set -uo pipefail # no -e: a failing step must not stop the ones after it

cd "$(dirname "$0")/.." || exit 99
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=offline WANDB_SILENT=true
# Installed, kernels/ is the package `fusedce` and lightning_modules/, datamodules/ its
# subpackages (pyproject.toml). A GPU machine's copy of the tree need not be installed: a tree of
# links gives Python that layout, on the working tree's files, with nothing to build.
PKG_ROOT="${TMPDIR:-/tmp}/fusedce_pkg_$$"
rm -rf "$PKG_ROOT" && mkdir -p "$PKG_ROOT/fusedce"
ln -s "$PWD"/kernels/*.py "$PKG_ROOT/fusedce/"
for sub in "$PWD"/kernels/*/; do # subpackages (fusedce.integrations)
  [ -f "$sub/__init__.py" ] && ln -s "${sub%/}" "$PKG_ROOT/fusedce/$(basename "$sub")"
done
ln -s "$PWD/lightning_modules" "$PKG_ROOT/fusedce/lightning_modules"
ln -s "$PWD/datamodules" "$PKG_ROOT/fusedce/datamodules"
export PYTHONPATH="$PKG_ROOT:$PWD${PYTHONPATH:+:$PYTHONPATH}"
trap 'rm -rf "$PKG_ROOT" "${EXTRA_OUT:-}" "${TMPDIR:-/tmp}/fusedce_runs_$$"' EXIT
OUT="${OUT:-/tmp/fusedce_gpu_check}"
mkdir -p "$OUT"
DRY="${FUSEDCE_GPU_CHECK_DRY:-0}"
STEPS_WANTED=",${FUSEDCE_GPU_CHECK_STEPS:-tests,host,train,ce,lce},"
FUSEDCE_GIT_COMMIT="${FUSEDCE_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export FUSEDCE_GIT_COMMIT
export FUSEDCE_BACKEND="${FUSEDCE_BACKEND:-auto}" # read by fusedce at import
PY="${PYTHON:-python3}"
TOTAL_S="${FUSEDCE_GPU_CHECK_TOTAL_S:-510}" # whole script; the device allows 600 per command
LCE_RESERVE_S=100                            # kept back for the linear benchmark
LOG="$OUT/gpu_check.log"
EXTRA_OUT="${TMPDIR:-/tmp}/fusedce_extra_$$" # the linear and integration benchmarks' files
rm -rf "$EXTRA_OUT" && mkdir -p "$EXTRA_OUT"
START=$SECONDS
FAILED=0
STEPS=()

log() { echo "$*" | tee -a "$LOG"; }
step() { log "" && log "=== [$((SECONDS - START)) s] $*"; }
left() { echo $((TOTAL_S - (SECONDS - START))); }
record() { # name, exit code
  STEPS+=("$1: exit $2")
  if [ "$2" -ne 0 ]; then FAILED=$((FAILED + 1)); fi
}
wanted() { [[ "$STEPS_WANTED" == *",$1,"* ]]; }
clamp() { # value, lo, hi
  local v=$1
  ((v < $2)) && v=$2
  ((v > $3)) && v=$3
  echo "$v"
}

# --- carried wheels (Liger-Kernel for the rival column, ...) ------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  step "installing carried wheels: $(ls .whl)"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site" # after the repo and the image's own packages
  else
    log "wheel install failed; continuing without them"
  fi
fi

# --- environment ---------------------------------------------------------------------------
step "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import fusedce
    print("fusedce", fusedce.__file__, "backend", fusedce.get_backend(),
          "of", fusedce.available_backends())
except Exception as exc:
    print("fusedce: not importable:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
print("CUDA device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import liger_kernel  # noqa: F401
    from importlib.metadata import version
    print("liger_kernel", version("liger_kernel"))
except Exception as exc:
    print("liger_kernel: not importable:", type(exc).__name__)
EOF
} 2>&1 | tee -a "$LOG"

# --- tests: the GPU file (tests/test_gpu.py, and GPU tests elsewhere) and the kernel suites -
if wanted tests; then
  step "tests: pytest -m 'gpu or kernel'"
  TEST_LIMIT=$(clamp $(($(left) - LCE_RESERVE_S - 200)) 30 130)
  # No -x: one failure must not hide the others (under xdist -x stops every worker).
  PYTEST_ARGS=(-m "gpu or kernel" -q --maxfail=25 -p no:cacheprovider --continue-on-collection-errors)
  if [ "$DRY" = "1" ]; then
    PYTEST_ARGS=(-m "gpu" -q -x -p no:cacheprovider --continue-on-collection-errors)
  elif "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST_ARGS+=(-n 8 --dist loadfile)
  fi
  log "limit ${TEST_LIMIT} s: $PY -m pytest ${PYTEST_ARGS[*]} tests/"
  timeout -k 10 "$TEST_LIMIT" "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/ 2>&1 |
    tee "$OUT/gpu_tests.log" | tail -n 25 | tee -a "$LOG"
  record "tests" $?
fi

# --- host time per call, and launch configurations (asked for by name) --------------------
# A dry run takes each of them on the CPU: the host code around stubbed kernels, the launch
# candidates under Triton's interpreter at a tiny shape, two training steps.
if wanted host; then
  step "host time per call: python -m benchmarks.profile_host"
  HOST_ARGS=(--device cuda)
  [ "$DRY" = "1" ] && HOST_ARGS=(--device cpu --n 4 --v 512 --calls 50)
  TRITON_INTERPRET="$DRY" timeout -k 5 40 "$PY" -m benchmarks.profile_host "${HOST_ARGS[@]}" 2>&1 |
    tee "$EXTRA_OUT/profile_host.log" | head -n 16 | tee -a "$LOG"
  record "profile_host" $?
fi
if wanted tune; then
  step "launch configurations: python -m benchmarks.tune_launch"
  TUNE_ARGS=(--shapes "${FUSEDCE_TUNE_SHAPES:-8192x32000,16384x50257,8192x128256}")
  [ "$DRY" = "1" ] && TUNE_ARGS=(--device cpu --shapes 5x300 --dtypes bf16)
  TRITON_INTERPRET="$DRY" timeout -k 5 "${FUSEDCE_TUNE_S:-100}" "$PY" -m benchmarks.tune_launch \
    "${TUNE_ARGS[@]}" 2>&1 | tee -a "$LOG"
  record "tune_launch" $?
fi
if wanted train; then
  step "training: large-vocabulary preset, fused head vs unfused"
  TRAIN_STEPS="${FUSEDCE_TRAIN_STEPS:-100}"
  [ "$DRY" = "1" ] && TRAIN_STEPS=2
  timeout -k 10 "${FUSEDCE_TRAIN_S:-90}" "$PY" -m benchmarks.train_compare --steps "$TRAIN_STEPS" \
    --root "${TMPDIR:-/tmp}/fusedce_runs_$$" 2>&1 | tee "$EXTRA_OUT/train_compare.log" |
    tail -n 8 | tee -a "$LOG"
  record "train_compare" $?
fi

# --- cross-entropy benchmark ---------------------------------------------------------------
if wanted ce; then
  step "cross-entropy benchmark"
  CE_LIMIT=$(clamp $(($(left) - LCE_RESERVE_S)) 60 300)
  CE_BUDGET=$((CE_LIMIT - 45)) # the last cell, the plot and a torch.compile warm-up fit in 45 s
  CE_ARGS=(--out "$OUT" --max-seconds "$CE_BUDGET")
  [ "$DRY" = "1" ] && CE_ARGS+=(--quick --device cpu
    --providers fusedce,fusedce_inplace,fusedce_extras,fusedce_all,eager)
  log "limit ${CE_LIMIT} s: $PY -m benchmarks.bench_cross_entropy ${CE_ARGS[*]}"
  timeout -k 15 "$CE_LIMIT" "$PY" -m benchmarks.bench_cross_entropy "${CE_ARGS[@]}" 2>&1 |
    tee -a "$LOG"
  record "bench_cross_entropy" $?
fi

# --- linear cross-entropy benchmark (if present) -------------------------------------------
if wanted lce && [ -f benchmarks/bench_linear_cross_entropy.py ]; then
  step "linear cross-entropy benchmark"
  LCE_LIMIT=$(clamp $(($(left) - 5)) 20 "$LCE_RESERVE_S")
  LCE_ARGS=(--out "$EXTRA_OUT")
  [ "$DRY" = "1" ] && LCE_ARGS+=(--quick --device cpu --no-memory --n 64 --d 32 --v 500)
  log "limit ${LCE_LIMIT} s: $PY -m benchmarks.bench_linear_cross_entropy ${LCE_ARGS[*]}"
  timeout -k 10 "$LCE_LIMIT" "$PY" -m benchmarks.bench_linear_cross_entropy "${LCE_ARGS[@]}" 2>&1 |
    tee -a "$LOG"
  record "bench_linear_cross_entropy" $?
else
  step "linear cross-entropy benchmark: not asked for, or not present"
fi

# --- transformers integration: training-step memory, patched vs unpatched (asked for by name)
if wanted integ; then
  step "integration benchmark: python -m benchmarks.bench_integrations"
  INTEG_LIMIT=$(clamp $(($(left) - 5)) 30 "${FUSEDCE_INTEG_S:-150}")
  read -r -a INTEG_ARGS <<<"${FUSEDCE_INTEG_ARGS:-}"
  INTEG_ARGS=(--out "$EXTRA_OUT" "${INTEG_ARGS[@]}")
  [ "$DRY" = "1" ] && INTEG_ARGS+=(--quick --device cpu)
  log "limit ${INTEG_LIMIT} s: $PY -m benchmarks.bench_integrations ${INTEG_ARGS[*]}"
  timeout -k 10 "$INTEG_LIMIT" "$PY" -m benchmarks.bench_integrations "${INTEG_ARGS[@]}" 2>&1 |
    tee -a "$LOG"
  record "bench_integrations" $?
fi

# --- vocabulary-parallel loss: bytes and time vs gathering the logits (asked for by name) -----
if wanted vp; then
  VP_ARGS=(--out "$EXTRA_OUT")
  [ "$DRY" = "1" ] && VP_ARGS+=(--quick --device cpu)
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$DRY" != "1" ] && [ "${NGPU:-0}" -lt 2 ]; then
    step "vocab-parallel benchmark: skipped, it needs >= 2 GPUs (NCCL, one per rank); found ${NGPU:-0}"
  else
    step "vocab-parallel benchmark: python -m benchmarks.bench_vocab_parallel"
    VP_LIMIT=$(clamp $(($(left) - 5)) 30 "${FUSEDCE_VP_S:-150}")
    read -r -a VP_EXTRA <<<"${FUSEDCE_VP_ARGS:-}"
    VP_ARGS+=("${VP_EXTRA[@]}")
    log "limit ${VP_LIMIT} s: $PY -m benchmarks.bench_vocab_parallel ${VP_ARGS[*]}"
    timeout -k 10 "$VP_LIMIT" "$PY" -m benchmarks.bench_vocab_parallel "${VP_ARGS[@]}" 2>&1 |
      tee -a "$LOG"
    record "bench_vocab_parallel" $?
  fi
fi

# --- distillation: the fused head's time against linear_cross_entropy (asked for by name) -----
if wanted distill; then
  step "distillation benchmark: python -m benchmarks.bench_distillation"
  DISTILL_LIMIT=$(clamp $(($(left) - 5)) 30 "${FUSEDCE_DISTILL_S:-120}")
  DISTILL_ARGS=(--out "$EXTRA_OUT/distill.md")
  [ "$DRY" = "1" ] && DISTILL_ARGS+=(--shape 64x16x512 --dtype fp32 --k 8 --device cpu)
  log "limit ${DISTILL_LIMIT} s: $PY -m benchmarks.bench_distillation ${DISTILL_ARGS[*]}"
  timeout -k 10 "$DISTILL_LIMIT" "$PY" -m benchmarks.bench_distillation "${DISTILL_ARGS[@]}" 2>&1 |
    tee -a "$LOG"
  record "bench_distillation" $?
fi

# --- the run's flat records for scripts: <card>-<date>-summary.json (cross-entropy and linear) -
if wanted ce || wanted lce; then
  step "summary: python -m benchmarks.summary"
  "$PY" -m benchmarks.summary "$OUT" "$EXTRA_OUT" --out-dir "$OUT" 2>&1 | tee -a "$LOG"
  record "summary" $?
fi

# At most 8 files come back: copy the other files (linear, integration, distillation
# benchmarks, host profile, training comparison) if they fit, else one tarball.
mapfile -t extra_files < <(find "$EXTRA_OUT" -type f | sort)
have=$(find "$OUT" -type f | wc -l)
if ((${#extra_files[@]} > 0)); then
  if ((have + ${#extra_files[@]} <= 8)); then
    cp "${extra_files[@]}" "$OUT"/
  else
    tar -czf "$OUT/extra_results.tar.gz" -C "$EXTRA_OUT" . &&
      log "linear / integration results tarred: $OUT/extra_results.tar.gz"
  fi
fi

# --- recap (the device tool returns the end of the output) ---------------------------------
step "recap"
{
  for s in "${STEPS[@]}"; do echo "  $s"; done
  [ -f "$OUT/gpu_tests.log" ] && grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 3
  declare -A shown=()
  for md in "$OUT"/*.md "$EXTRA_OUT"/*.md; do
    [ -f "$md" ] && [ -z "${shown[$(basename "$md")]:-}" ] || continue
    shown[$(basename "$md")]=1
    echo "--- $(basename "$md")"
    if grep -q "^## Summary" "$md"; then
      sed -n '/^## Summary/,/^## Every provider/p' "$md" | grep -E "^\|" | cut -c1-200
      grep -E "^Cells run" "$md"
    else
      grep -E "^\||^fusedce / unpatched" "$md" | head -n 20 | cut -c1-170
    fi
  done
  echo "files in \$OUT ($(find "$OUT" -type f | wc -l), at most 8 come back):"
  find "$OUT" -type f -printf '  %P %s bytes\n' | sort
  echo "total $((SECONDS - START)) s; failed steps: $FAILED"
} 2>&1 | tee -a "$LOG"
exit "$FAILED"
