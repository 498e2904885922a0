#!/usr/bin/env bash
# The project's one prepared GPU check (docs/kernels.md): build an environment with CUDA torch, run
# the GPU tests and the kernel tests on CUDA, run every bench/bench_*.py with --quick, print a table.
#
#   bash bench/gpu_check.sh              # on a machine with an NVIDIA GPU (about 10 minutes at most)
#   bash bench/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU with the existing .venv
#
# Every step runs under a timeout inside one overall budget (GPU_CHECK_BUDGET_S, default 570 s); a
# failing step is reported loudly and the next one still runs. The whole log and a Markdown summary
# go to $OUT (when set) or runs/gpu_check/: gpu_check.log and summary.md. Exit status: 0 only when
# every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
LOG_DIR=${OUT:-runs/gpu_check}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
SUMMARY="$LOG_DIR/summary.md"
: >"$LOG"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-570}
GPU_VENV=build/venv-gpu  # build/ is git-ignored; `make clean` removes it
export PYTHONUNBUFFERED=1
ROWS=()
FAILED=0

say() { echo "$@" | tee -a "$LOG"; }

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), logs, records a row.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 15))
    if ((left < 20)); then
        say "!!! SKIPPED $name: the ${BUDGET}s budget is spent"
        ROWS+=("| $name | SKIPPED (no time left) | 0 |")
        FAILED=1
        return 1
    fi
    local limit=$((cap < left ? cap : left)) t0=$(date +%s) rc
    say ""
    say "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local secs=$(($(date +%s) - t0)) status="ok"
    if ((rc == 124 || rc == 137)); then
        status="TIMEOUT after ${limit}s"
    elif ((rc == 5)) && [[ "$*" == *pytest* ]]; then
        status="ok (no tests selected)"
        rc=0
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    ((rc != 0)) && { FAILED=1; say "!!! $name: $status (see $LOG)"; }
    ROWS+=("| $name | $status | $secs |")
    return "$rc"
}

cuda_ok() { [[ -x "$1" ]] && "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# An environment with CUDA torch: reuse one that works; else `make build` (which installs the CUDA
# torch when nvidia-smi works) when PyPI is reachable; else, offline, a venv that sees the machine's
# own CUDA torch (its site-packages through a .pth) with this repo installed editable into it.
build_env() {
    local torch_site venv_site
    if cuda_ok $GPU_VENV/bin/python || cuda_ok .venv/bin/python; then
        echo "reusing an environment whose torch sees CUDA"
    elif timeout 8 python3 -c "import urllib.request as u; u.urlopen('https://pypi.org/simple/pip/', timeout=5)" 2>/dev/null; then
        make VENV=$GPU_VENV build || return 1
    else
        echo "PyPI unreachable: building $GPU_VENV on top of $(command -v python3)'s torch"
        torch_site=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))") || return 1
        python3 -c "import torch; assert torch.cuda.is_available(), 'python3 has no CUDA torch'" || return 1
        [[ -x $GPU_VENV/bin/python ]] || python3 -m venv --without-pip $GPU_VENV || return 1
        venv_site=$($GPU_VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        echo "$torch_site" >"$venv_site/_system_torch.pth"
        $GPU_VENV/bin/python -m pip install -q --no-build-isolation --no-deps -e . ||
            WSSHM_NO_CUDA=1 $GPU_VENV/bin/python -m pip install -q --no-build-isolation --no-deps -e . ||
            return 1
    fi
}

if ((DRY_RUN)); then
    say "DRY RUN: CPU, existing .venv, kernels in Triton's interpreter"
    PY=.venv/bin/python
    export DS_ACCELERATOR=cpu TRITON_INTERPRET=1
else
    command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$LOG" || say "!!! nvidia-smi not found"
    export -f build_env cuda_ok
    export GPU_VENV
    run_step "environment (CUDA torch)" 300 bash -c build_env
    PY=.venv/bin/python
    cuda_ok $GPU_VENV/bin/python && PY=$GPU_VENV/bin/python
    export DS_ACCELERATOR=cuda
    unset TRITON_INTERPRET
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null || echo "no working python")
say "python: $PY, card: $CARD"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

run_step "pytest -m gpu tests" 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
run_step "kernel tests (tests/test_kernels.py)" 150 "$PY" -m pytest -m "not gpu" -q -p no:cacheprovider tests/test_kernels.py
# The kernel benchmark first (this check's main purpose), then the others in name order.
for bench in bench/bench_losses.py $(ls bench/bench_*.py | grep -v '^bench/bench_losses.py$'); do
    [[ -e "$bench" ]] || continue
    run_step "$bench --quick" 240 "$PY" "$bench" --quick
done

{
    echo "# GPU check on $CARD ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo no-git))"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    grep -E "^(\| )?Goal |^MISMATCH" "$LOG" | sed -E "s/^\| //; s/ \|( \|)*$//" | sort -u || true
} >"$SUMMARY"
say ""
cat "$SUMMARY" | tee -a "$LOG"
((FAILED)) && say "!!! GPU check: at least one step failed or was skipped"
exit "$FAILED"
