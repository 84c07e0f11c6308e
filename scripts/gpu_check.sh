#!/usr/bin/env bash
# One command for a lent GPU machine (README "GPU check"): install this tree without a registry, record
# the machine, run every CUDA/CuPy/JAX-GPU test, the GPU conformance rows and the GPU bench, and keep
# every log and JSON under one folder. Each step has a time limit and none runs past the budget (9.5 min).
#
#   bash scripts/gpu_check.sh [--dry-run] [OUT_DIR]     # from the repository root
#
# OUT_DIR: default $OUT when set (as on the lent machine), else gpu-check-out/ (git-ignored).
# --dry-run or DRY_RUN=1: print every command with its limit and check what a CPU machine can (bash
# syntax of both scripts, the wheels in .whl/, the executables and the flags the commands use); runs
# nothing heavy. The wheels come from `bash scripts/fetch_gpu_wheels.sh`, run where a registry is.
# A failing step does not stop the others; the exit status is non-zero when any step failed.
#
# Environment: PYTHON (default python3); GPU_CHECK_BUDGET_S (default 570: no step starts or runs past
# it); GPU_CHECK_ONLY="bench conformance" (run only these steps); GPU_CHECK_LIMITS="bench=150" (other
# limits, seconds); XLA_PYTHON_CLIENT_PREALLOCATE (default false: JAX shares the GPU with torch, CuPy);
# GPU_CHECK_CAPTURE=1 adds the step capture (scripts/gpu_capture_check.py; run it alone: GPU_CHECK_ONLY=capture).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

DRY_RUN=${DRY_RUN:-0}
OUT_DIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
        *) OUT_DIR=$arg ;;
    esac
done
[[ "$DRY_RUN" == 0 || -z "$DRY_RUN" ]] && DRY_RUN=0 || DRY_RUN=1
OUT_DIR=${OUT_DIR:-${OUT:-gpu-check-out}}
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$ROOT/$OUT_DIR" ;; esac

PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-570}  # 9.5 minutes: a lent machine's 10-minute command, less 30 s of margin
MIN_STEP_S=${GPU_CHECK_MIN_STEP_S:-5}  # a step with less time than this left is not started
GRACE_S=5          # after a step's limit: SIGINT (pytest still writes its report), then SIGKILL 5 s later
WHEEL_DIR=.whl
WHEELS=(array_api_compat array_api_strict adamp)   # file-name prefixes of the wheels fetch_gpu_wheels.sh gets
SITE="${TMPDIR:-/tmp}/adamp-xp-gpu-check-site"      # the wheels unpacked here when pip cannot install them
# The tree's own code always comes first (whether or not the editable install worked), then the unpacked
# wheels; pip-installed packages come after.
export PYTHONPATH="$ROOT:$ROOT/adapters:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export PYTHONUNBUFFERED=1

# Every GPU case and nothing of the CPU suite: the `backend` fixture ids torch:cuda / jax:gpu / cupy (and
# their -absent entries), the torch adapter's `cuda` device ids, tests named for CUDA, and the two tests
# that need a second device (named "other/another device"). tests/integration/ has no GPU case and needs
# clients the GPU machine lacks; this file's own tests match "gpu" by name. Two runs: torch:cuda and CuPy
# first, then jax:gpu (eager JAX compiles every operation for the GPU: the slow part), with the time left.
PYTEST_K="cuda or gpu or cupy or other_device or another_device"
PYTEST_FILES=(tests --ignore=tests/integration --ignore=tests/test_gpu_check.py)
PYTEST_OPTS=(-q -rfEs --durations=20 --continue-on-collection-errors)

quote() {  # shell words, each quoted only where it needs it (readable, and safe to eval)
    local w out=()
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

wheel_files() {  # the .whl/ file of each wheel prefix, in WHEELS order; nothing for a missing one
    local p f
    for p in "${WHEELS[@]}"; do
        for f in "$WHEEL_DIR/$p"-*.whl; do [[ -e "$f" ]] && { echo "$f"; break; }; done
    done
}
mapfile -t WHEEL_FILES < <(wheel_files)
WHEEL_ARGS=("${WHEEL_FILES[@]:-$WHEEL_DIR/MISSING.whl}")

# ---- the steps: name, limit in seconds ("rest": what the budget has left), command.
STEP_NAMES=() STEP_LIMITS=() STEP_CMDS=()
add_step() {  # add_step NAME LIMIT CMD...
    local name=$1 limit=$2 kv
    shift 2
    for kv in ${GPU_CHECK_LIMITS:-}; do [[ "${kv%%=*}" == "$name" ]] && limit=${kv#*=}; done
    STEP_NAMES+=("$name")
    STEP_LIMITS+=("$limit")
    STEP_CMDS+=("$(quote "$@")")
}
add_step install-wheels 15 "$PYTHON" -m pip install --no-index --no-deps "${WHEEL_ARGS[@]}"
# Only where install-wheels fails (no pip, an externally managed Python): unpack them onto PYTHONPATH.
add_step install-wheels-unpack 10 "$PYTHON" scripts/unpack_wheels.py "$SITE" "${WHEEL_ARGS[@]}"
add_step install-project 25 "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e .
add_step nvidia-smi 10 nvidia-smi
add_step machine 30 "$PYTHON" scripts/gpu_machine_info.py "$OUT_DIR/machine.json"
add_step pytest-cuda 140 "$PYTHON" -m pytest "${PYTEST_OPTS[@]}" "${PYTEST_FILES[@]}" \
    -k "($PYTEST_K) and not jax:gpu" --junitxml "$OUT_DIR/pytest-cuda.xml"
# The fused Triton step (issue 18): against fused AdamW, adamp 0.3.0 and the multi-tensor step on ResNet-50
# shapes and 2,000 small tensors, with memory and GPU launches, and a CUDA-graph capture of optimizer.step().
add_step triton 100 "$PYTHON" scripts/gpu_triton_check.py "$OUT_DIR/triton.json"
# Captured and compiled steps (issue 24): torch.cuda.graph and torch.compile(mode="reduce-overhead") of
# optimizer.step() with capturable=True on each CUDA path, against eager and AdamW(fused=True, capturable=True).
# The steps above spend the budget: a command of its own, GPU_CHECK_CAPTURE=1 GPU_CHECK_ONLY=capture.
if [[ "${GPU_CHECK_CAPTURE:-0}" == 1 ]]; then
    add_step capture 400 "$PYTHON" scripts/gpu_capture_check.py "$OUT_DIR/capture.json"
fi
add_step conformance 70 "$PYTHON" -m adamp_xp.cli conformance --device cuda --json "$OUT_DIR/conformance-cuda.json"
add_step bench 90 "$PYTHON" -m adamp_xp.cli bench --device cuda --quick --json "$OUT_DIR/bench-cuda.json"
add_step pytest-jax-gpu rest "$PYTHON" -m pytest "${PYTEST_OPTS[@]}" "${PYTEST_FILES[@]}" \
    -k "jax:gpu" --junitxml "$OUT_DIR/pytest-jax-gpu.xml"

selected() {  # is step $1 in GPU_CHECK_ONLY (everything when unset)?
    [[ -z "${GPU_CHECK_ONLY:-}" || " $GPU_CHECK_ONLY " == *" $1 "* ]]
}

print_plan() {
    local i fixed=0 limit note
    for i in "${!STEP_NAMES[@]}"; do
        [[ "${STEP_LIMITS[$i]}" == rest ]] || fixed=$((fixed + STEP_LIMITS[i] + GRACE_S))
    done
    echo "gpu_check: repository $ROOT"
    echo "gpu_check: output folder $OUT_DIR (<step>.log for each step, summary.txt, summary.json)"
    echo "gpu_check: budget ${BUDGET_S} s; a step is stopped at its limit (SIGINT, SIGKILL ${GRACE_S} s later)" \
         "and none starts or runs past the budget"
    echo "gpu_check: PYTHONPATH=$PYTHONPATH"
    echo "gpu_check: XLA_PYTHON_CLIENT_PREALLOCATE=$XLA_PYTHON_CLIENT_PREALLOCATE"
    [[ -n "${GPU_CHECK_ONLY:-}" ]] && echo "gpu_check: only $GPU_CHECK_ONLY"
    for i in "${!STEP_NAMES[@]}"; do
        selected "${STEP_NAMES[$i]}" || continue
        limit=${STEP_LIMITS[$i]} note=""
        [[ "$limit" == rest ]] && limit="rest" note="  (the budget left: >= $((BUDGET_S - fixed - GRACE_S)) s)"
        [[ "${STEP_NAMES[$i]}" == install-wheels-unpack ]] && note="  (only if install-wheels fails)"
        printf '[%-21s limit %4s s] %s > %s%s\n' "${STEP_NAMES[$i]}" "$limit" "${STEP_CMDS[$i]}" \
            "$OUT_DIR/${STEP_NAMES[$i]}.log" "$note"
    done
}

# ---- dry run: print the plan, check what a CPU machine can, run nothing heavy.
if [[ "$DRY_RUN" == 1 ]]; then
    print_plan
    warnings=0 errors=0
    check() {  # check ok|WARN|ERROR MESSAGE
        printf 'check: %-5s %s\n' "$1" "$2"
        case "$1" in WARN) warnings=$((warnings + 1)) ;; ERROR) errors=$((errors + 1)) ;; esac
    }
    for s in scripts/gpu_check.sh scripts/fetch_gpu_wheels.sh; do
        if bash -n "$s" 2>/dev/null; then check ok "bash -n $s"; else check ERROR "bash -n $s: syntax error"; fi
    done
    for s in scripts/gpu_machine_info.py scripts/unpack_wheels.py scripts/gpu_triton_check.py \
        scripts/gpu_capture_check.py; do
        if [[ -f "$s" ]]; then check ok "$s present"; else check ERROR "$s missing"; fi
    done
    if [[ -d "$WHEEL_DIR" ]]; then check ok "$WHEEL_DIR/ present"; else check WARN "$WHEEL_DIR/ absent"; fi
    for p in "${WHEELS[@]}"; do
        f=$(printf '%s\n' "${WHEEL_FILES[@]}" | grep -m1 "/$p-" || true)
        if [[ -n "$f" ]]; then check ok "wheel $f"; else
            check WARN "wheel $WHEEL_DIR/$p-*.whl missing: run bash scripts/fetch_gpu_wheels.sh where a registry is"
        fi
    done
    for exe in "$PYTHON" timeout nvidia-smi; do
        if command -v "$exe" >/dev/null; then check ok "executable $exe: $(command -v "$exe")"
        elif [[ "$exe" == nvidia-smi ]]; then check WARN "executable nvidia-smi not found (no GPU here)"
        else check ERROR "executable $exe not found"; fi
    done
    # One light Python process: the modules the steps run exist, and the flags they pass are in the
    # subcommands' --help (argparse only: no backend is imported).
    py_check=$("$PYTHON" - <<'EOF' 2>&1
import contextlib, importlib.util, io
for mod in ("pip", "pytest", "hypothesis", "adamp_xp.cli"):
    print(("ok    " if importlib.util.find_spec(mod) else "WARN  ") + f"python module {mod}")
from adamp_xp.cli import main
for sub, flags in (("conformance", ["--device", "--json"]), ("bench", ["--device", "--quick", "--json"])):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([sub, "--help"])
    have = {w.strip(",[]") for w in buf.getvalue().split()}
    for flag in flags:
        print(("ok    " if flag in have else "WARN  ") + f"adamp-xp {sub} {flag}" + ("" if flag in have else ": not in --help"))
EOF
    ) || { check ERROR "python check failed: $py_check"; py_check=""; }
    while IFS= read -r line; do
        [[ -z "$line" ]] && continue
        check "${line%% *}" "${line:6}"
    done <<<"$py_check"
    echo "gpu_check: dry run: $errors error(s), $warnings warning(s); nothing was run"
    [[ "$errors" == 0 ]]
    exit
fi

# ---- the real run.
mkdir -p "$OUT_DIR" || exit 2
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
# A parent that ignores SIGINT (a job started with &) passes that on; reset it so that the limit's SIGINT
# reaches pytest, which then still writes its report.
RESET_INT=()
env --default-signal=INT true 2>/dev/null && RESET_INT=(env --default-signal=INT)
SUMMARY_ROWS=() FAILED=()

outcome() {  # the last line of a log that counts passed/failed tests or rows
    grep -E '[0-9]+ (passed|failed|skipped|error)' "$1" 2>/dev/null | tail -n 1 | sed 's/^=* *//; s/ *=*$//' \
        | cut -c1-90
}

run_step() {  # run_step INDEX -> the step's exit status; one summary row "name|status|seconds|limit|outcome"
    local name=${STEP_NAMES[$1]} limit=${STEP_LIMITS[$1]} cmd=${STEP_CMDS[$1]} log left t0 rc secs
    log="$OUT_DIR/$name.log"
    left=$((DEADLINE - $(date +%s) - GRACE_S))
    [[ "$limit" == rest ]] || ((left < limit)) && limit=$left
    if ((limit < MIN_STEP_S)); then
        echo "gpu_check: $name not run: the ${BUDGET_S} s budget is spent" | tee "$log"
        SUMMARY_ROWS+=("$name|not run (budget)|0|0|")
        return 125
    fi
    echo "gpu_check: [$name, limit $limit s] $cmd"
    t0=$(date +%s)
    {
        echo "\$ $cmd"
        echo "# limit $limit s, started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        eval "timeout --signal=INT --kill-after=$GRACE_S $limit ${RESET_INT[*]:-} $cmd"
    } >"$log" 2>&1 </dev/null
    rc=$?
    secs=$(($(date +%s) - t0))
    if ((rc == 124 || rc == 137)); then
        echo "# stopped at its limit of $limit s" >>"$log"
        echo "gpu_check: [$name] stopped at its limit of $limit s (exit status $rc)"
    else
        echo "gpu_check: [$name] exit status $rc, $secs s"
    fi
    echo "# exit status $rc after $secs s" >>"$log"
    SUMMARY_ROWS+=("$name|$rc|$secs|$limit|$(outcome "$log")")
    return "$rc"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(timeout 5 git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "changes:"
    timeout 5 git status --short 2>/dev/null || echo "(no git here)"
    echo
    print_plan
} >"$OUT_DIR/plan.txt" 2>&1
cat "$OUT_DIR/plan.txt"

wheels_ok=1
for i in "${!STEP_NAMES[@]}"; do
    name=${STEP_NAMES[$i]}
    selected "$name" || continue
    case "$name" in
        install-wheels)
            rm -rf "$SITE"
            run_step "$i" || wheels_ok=0
            ;;
        install-wheels-unpack)
            ((wheels_ok)) && continue
            mkdir -p "$SITE"
            if run_step "$i"; then
                row=${SUMMARY_ROWS[-2]} && SUMMARY_ROWS[-2]="${row%|*}|unpacked instead"
            else
                FAILED+=(install-wheels)
            fi
            ;;
        install-project)
            # The tree is on PYTHONPATH anyway: a failed editable install only costs the `adamp-xp` script.
            run_step "$i" || { row=${SUMMARY_ROWS[-1]} && SUMMARY_ROWS[-1]="${row%|*}|PYTHONPATH used instead"; }
            ;;
        *)
            run_step "$i" || FAILED+=("$name")
            ;;
    esac
done
# pip failed and nothing unpacked the wheels (GPU_CHECK_ONLY left the unpack step out)
((wheels_ok)) || selected install-wheels-unpack || FAILED+=(install-wheels)

# ---- summary.txt and summary.json
total=$(($(date +%s) - START))
{
    echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $total s of a ${BUDGET_S} s budget; logs in $OUT_DIR)"
    printf '%-22s %-17s %7s %6s  %s\n' step "exit status" seconds limit outcome
    for row in "${SUMMARY_ROWS[@]}"; do
        IFS='|' read -r n rc s l o <<<"$row"
        printf '%-22s %-17s %7s %6s  %s\n' "$n" "$rc" "$s" "$l" "$o"
    done
    if ((${#FAILED[@]})); then echo "FAILED: ${FAILED[*]}"; else echo "all steps passed"; fi
} >"$OUT_DIR/summary.txt"
{
    printf '{\n  "seconds": %s,\n  "budget_s": %s,\n  "failed": [' "$total" "$BUDGET_S"
    sep=""
    for n in "${FAILED[@]}"; do printf '%s"%s"' "$sep" "$n"; sep=", "; done
    printf '],\n  "steps": [\n'
    sep=""
    for row in "${SUMMARY_ROWS[@]}"; do
        IFS='|' read -r n rc s l o <<<"$row"
        o=${o//\\/\\\\}
        printf '%s    {"step": "%s", "exit_status": "%s", "seconds": %s, "limit_s": %s, "outcome": "%s"}' \
            "$sep" "$n" "$rc" "$s" "$l" "${o//\"/\\\"}"
        sep=$',\n'
    done
    printf '\n  ]\n}\n'
} >"$OUT_DIR/summary.json"
echo
cat "$OUT_DIR/summary.txt"
((${#FAILED[@]} == 0))
