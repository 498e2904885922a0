#!/usr/bin/env bash
# The project's one prepared GPU check (docs/benchmarks.md, "The GPU check"): build an environment with CUDA torch, run
# the kernel and csrc tests on CUDA, the GPU benchmarks with --quick and the demo pipeline on the GPU,
# and print a table.
#
#   bash bench/gpu_check.sh              # on a machine with an NVIDIA GPU (about 10 minutes at most)
#   bash bench/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU with the existing .venv
#
# Every step runs under a timeout inside one overall budget (GPU_CHECK_BUDGET_S, default 570 s, 1200 s
# with --dry-run); a failing step is reported loudly and the next one still runs. The whole log and a
# Markdown summary go to $OUT (when set) or runs/gpu_check/: gpu_check.log and summary.md. Exit
# status: 0 only when every step passed.
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
# 570 s fits one 10-minute call on a lent GPU machine; the CPU dry run has no such limit and is slower.
BUDGET=${GPU_CHECK_BUDGET_S:-$((DRY_RUN ? 1200 : 570))}
GPU_VENV=build/venv-gpu  # build/ is git-ignored; `make clean` removes it
export PYTHONUNBUFFERED=1
ROWS=()
FAILED=0

say() { echo "$@" | tee -a "$LOG"; }

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), logs, records a row.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 15)) pattern
    for pattern in ${GPU_CHECK_SKIP:-}; do  # e.g. GPU_CHECK_SKIP="inference demo": steps already measured
        if [[ "$name" == *"$pattern"* ]]; then
            say "--- skipped $name (GPU_CHECK_SKIP)"
            return 0
        fi
    done
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
# torch when nvidia-smi works) when PyPI is reachable; else, offline (the lent GPU machines), the
# machine's own python3 and CUDA torch, with the packages it lacks carried as wheels in .whl/ (plus
# DALI's one-file wds2idx.py) and this repo installed editable into it.
build_env() {
    if cuda_ok $GPU_VENV/bin/python || cuda_ok .venv/bin/python; then
        echo "reusing an environment whose torch sees CUDA"
    elif timeout 8 python3 -c "import urllib.request as u; u.urlopen('https://pypi.org/simple/pip/', timeout=5)" 2>/dev/null; then
        make VENV=$GPU_VENV build || return 1
    else
        echo "PyPI unreachable: using $(command -v python3) and its torch"
        python3 -c "import torch; assert torch.cuda.is_available(), 'python3 has no CUDA torch'" || return 1
        # pip's editable install falls back to `setup.py develop`, which fetches setuptools: build
        # in place instead; the caller puts the repo on PYTHONPATH, and wsshm.kernels (setup.py maps
        # it to kernels/) is reached through a link made here, on the lent machine's copy only.
        python3 setup.py -q build_ext --inplace || return 1
        [[ -e wsshm/kernels ]] || ln -s ../kernels wsshm/kernels
        python3 -c "import wsshm._C as C; print('wsshm._C built:', C.build_info())" || return 1
    fi
}

if ((DRY_RUN)); then
    say "DRY RUN: CPU, existing .venv, kernels in Triton's interpreter"
    PY=.venv/bin/python
    export DS_ACCELERATOR=cpu TRITON_INTERPRET=1
else
    command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$LOG" || say "!!! nvidia-smi not found"
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "installing the carried wheels: $(ls .whl | tr '\n' ' ')"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tee -a "$LOG"
        cp .whl/*.py /tmp/site/ 2>/dev/null
        export PATH=/tmp/site/bin:$PATH
    fi
    export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # one architecture, all cores: the extension's build is the slowest step of a fresh machine
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export -f build_env cuda_ok
    export GPU_VENV
    run_step "environment (CUDA torch, wsshm._C)" 300 bash -c build_env
    PY=python3
    cuda_ok .venv/bin/python && PY=.venv/bin/python
    cuda_ok $GPU_VENV/bin/python && PY=$GPU_VENV/bin/python
    export DS_ACCELERATOR=cuda
    unset TRITON_INTERPRET
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null || echo "no working python")
say "python: $PY, card: $CARD"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

# Most useful first: a step cut off by the budget loses the least.
# A C++ error must reach Python as an exception (one build crashed here instead); on a crash, a
# native backtrace from cuda-gdb, which also debugs host code.
THROW='import torch; from wsshm.data import fused_prepare
try:
    fused_prepare(torch.zeros(1, 4, 4, 3))
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])'
csrc_error_path() {
    "$PY" -c "$THROW" && return 0
    local rc=$?
    ((rc > 128)) && command -v cuda-gdb >/dev/null &&
        cuda-gdb -q -batch -ex run -ex bt --args "$PY" -c "$THROW" 2>&1 | grep -E "^#|signal" | head -30
    return "$rc"
}
export -f csrc_error_path
export PY THROW
run_step "csrc: a C++ error raises in Python" 60 bash -c csrc_error_path
# The issue users judge first: whole training steps against a plain PyTorch loop (unet_r18_w0.5 and
# unet_r101, 512 crops, batch 16 on a GPU).
if ((DRY_RUN)); then
    run_step "bench/bench_train.py --quick" 120 "$PY" bench/bench_train.py --quick
else
    run_step "bench/bench_train.py (r18_w0.5 and r101, 16 x 512)" 240 "$PY" bench/bench_train.py --steps 6
    # --compile's payoff: the student row again, its compilation in the warm-up column
    run_step "bench/bench_train.py --compile inductor (student, r18_w0.5, 16 x 512)" 180 "$PY" \
        bench/bench_train.py --steps 6 --stages student --archs unet_r18_w0.5 --compile inductor
fi
run_step "GPU tests: kernels and csrc on CUDA" 180 "$PY" -m pytest -q -p no:cacheprovider -n 4 -rf \
    tests/test_kernels.py tests/test_csrc.py
run_step "bench/bench_losses.py --quick" 120 "$PY" bench/bench_losses.py --quick
# The whole pipeline on the GPU: bf16 training through DeepSpeed with the fused kernels, evaluation,
# prediction, export.
# An older run's report must not pass for this one's if this one fails.
rm -f runs/gpu_demo/report.md
run_step "make demo's pipeline (python -m wsshm.demo --scale 0.3)" $((DRY_RUN ? 480 : 240)) "$PY" -m wsshm.demo \
    --scale 0.3 --out runs/gpu_demo --data runs/gpu_demo/data
if ((DRY_RUN)); then
    run_step "bench/bench_loaders.py --quick" 90 "$PY" bench/bench_loaders.py --quick
    run_step "bench/bench_inference.py --quick" 240 "$PY" bench/bench_inference.py --quick
else
    # the csrc op's GB/s at the goal's size (16 crops of 512), one short round of the loaders
    run_step "bench/bench_loaders.py (16 x 512, one round)" 120 "$PY" bench/bench_loaders.py --rounds 1 \
        --batches 4 --repeats 5
    run_step "bench/bench_inference_gpu.py --quick" 180 "$PY" bench/bench_inference_gpu.py --quick
fi

{
    echo "# GPU check on $CARD ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo no-git))"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    grep -E "^(\| )?Goal |^MISMATCH" "$LOG" | sed -E "s/^\| //; s/ \|( \|)*$//" | sort -u || true
    [[ -f runs/gpu_demo/report.md ]] && { echo; sed -n '1,40p' runs/gpu_demo/report.md; }
} >"$SUMMARY"
[[ -f runs/gpu_demo/report.md ]] && cp runs/gpu_demo/report.md "$LOG_DIR/demo_report.md"
say ""
cat "$SUMMARY" | tee -a "$LOG"
((FAILED)) && say "!!! GPU check: at least one step failed or was skipped"
exit "$FAILED"
