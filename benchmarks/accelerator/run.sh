#!/usr/bin/env bash
# One command that checks optax_ekfac on an accelerator and measures it there.
#
#   benchmarks/accelerator.sh              install, device, GPU tests, benchmarks:
#                                          under 8 minutes on one H100/H200
#   benchmarks/accelerator.sh --dry-run    the same at tiny sizes on CPU, with the
#                                          interpreter at hand (no install) and the
#                                          tests collected, not run: under 2 minutes
#
# Options: --out DIR (default benchmarks/results); --no-install (use the
# interpreter's packages as they are, e.g. on a machine without a registry).
# Environment: PYTHON=/path/to/python runs that interpreter (else python3 with
# --no-install or --dry-run; else a venv .venv-accelerator over the system's
# packages, or python3 where no venv can be made);
# ACCELERATOR_BUDGET_SECONDS (default 470, dry run 110) bounds the whole run.
#
# Every number goes to DIR/accelerator-<device>.json, rewritten after each
# part, so a failed or timed-out part leaves the others' numbers. Each step
# runs under `timeout` within the budget; the summary at the end names every
# step, test and benchmark part that failed, and the exit code is 1 if any did.
set -uo pipefail
cd "$(dirname "$0")/../.."

dry_run=0
install=1
out=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; install=0 ;;
    --no-install) install=0 ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done

start=$SECONDS
if [ "$dry_run" = 1 ]; then
  budget=${ACCELERATOR_BUDGET_SECONDS:-110}
  size_flag=--dry-run
  export JAX_PLATFORMS=cpu
  # Tiny programs: compiling them is the cost; level 0 halves it.
  export XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-}"
else
  budget=${ACCELERATOR_BUDGET_SECONDS:-470}
  size_flag=
fi
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/accelerator.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The checkout's optax_ekfac and benchmarks even where the install fails.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Steps compiled once are loaded, not compiled again, by later parts.
export JAX_COMPILATION_CACHE_DIR="$work/jax-cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

steps=()
# step NAME LIMIT COMMAND...: COMMAND under `timeout`, at most LIMIT seconds and
# what is left of the budget (10 s kept for the summary); records its status.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start) - 10))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -le 0 ]; then
    echo "!! $name: no time left, not run"
    steps+=("$name skipped 0 0")
    return
  fi
  echo "=== $name (at most $limit s)"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  steps+=("$name $rc $((SECONDS - t0)) $limit")
  if [ "$rc" -ne 0 ]; then echo "!! $name: exit $rc"; fi
}

# --- install: the project, its tests' packages, and the CUDA jax ---------------
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ "$install" = 0 ]; then
  py=python3
elif [ -x .venv-accelerator/bin/pip ]; then
  py=.venv-accelerator/bin/python
elif python3 -m venv --system-site-packages .venv-accelerator >/dev/null 2>&1; then
  py=.venv-accelerator/bin/python
else
  rm -rf .venv-accelerator  # no venv module or no ensurepip: the system's pip
  py=python3
  export PIP_BREAK_SYSTEM_PACKAGES=1
fi
if [ "$install" = 1 ]; then
  # A jax that already sees the GPU is kept; else the CUDA extra the driver
  # supports (its "CUDA Version" 13 or later: cuda13).
  if "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
    >/dev/null 2>&1; then
    extras=test
  else
    cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
    if [ "${cuda:-12}" -ge 13 ]; then extras=test,cuda13; else extras=test,cuda12; fi
  fi
  step install 240 "$py" -m pip install --disable-pip-version-check -q -e ".[$extras]"
fi

# --- the device -------------------------------------------------------------------
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
step device 60 "$py" -m benchmarks.accelerator --slug-file "$work/slug"
slug=$(cat "$work/slug" 2>/dev/null || true)
json="$out/accelerator-${slug:-unknown-device}.json"
rm -f "$json"
echo "device: ${slug:-unknown}; results: $json"

# --- the GPU subset of the tests ---------------------------------------------------
tests=(
  # capture and its scaling
  tests/test_capture.py::test_output_grads_are_per_example_gradients
  tests/test_capture.py::test_token_losses_scale_by_the_number_of_tokens
  tests/test_token_scale.py::test_kfac_takes_the_newton_step_of_the_mean_token_loss
  # the brute-force update of every layer kind (float64)
  tests/test_brute_force.py::test_blocks_match_brute_force
  # the NaN guard
  tests/test_reliability.py::test_a_non_finite_step_changes_nothing_but_the_skip_count
  tests/test_user_errors.py::test_ekfac_skips_a_non_finite_step_and_trains_on_as_if_it_never_happened
  # float32 against float64, and EKFAC's matmuls in float32
  tests/test_float32.py
  tests/test_matmul_precision.py
  # sharding over 4 devices (fake CPU devices, in a process of its own; the
  # benchmark part `sharding` shards over this machine's own devices)
  tests/test_sharding.py
)
if [ "$dry_run" = 1 ]; then
  step tests 60 "$py" -m pytest -q -p no:cacheprovider --collect-only "${tests[@]}"
else
  parallel=()
  if "$py" -c 'import xdist' >/dev/null 2>&1; then parallel=(-n 4 --dist loadfile); fi
  step tests 120 env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    "$py" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    --junitxml="$work/junit.xml" "${tests[@]}"
fi

# --- the benchmarks, most important first; each part saved as it ends ---------------
bench() { step "$1" "$2" "$py" -m benchmarks.accelerator --json "$json" $size_flag "${@:3}"; }
bench checks 120 device precision eigh sharding
bench mlp 180 mlp_step_cost memory
bench transformer 180 transformer

# --- the summary ----------------------------------------------------------------------
report=(-m benchmarks.accelerator.report --json "$json" --junit "$work/junit.xml"
  --steps "${steps[@]}"
  --expect device precision eigh sharding mlp_step_cost memory transformer)
rc=0
"$py" "${report[@]}" || rc=$?
if [ "$rc" -gt 1 ]; then  # the interpreter itself is broken: the system's reports
  python3 "${report[@]}"
  rc=1
fi
echo "total $((SECONDS - start)) s"
exit "$rc"
