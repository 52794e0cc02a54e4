#!/usr/bin/env bash
# The GPU check: tests/test_cuda.py, then every benchmark in bench/ at GPU sizes, then one markdown table.
#
#   bash bench/gpu_check.sh              # everything at GPU sizes (about 30-60 min on one H100-class GPU)
#   bash bench/gpu_check.sh --quick      # small sizes, a few minutes: checks the machinery
#
# Options:
#   --out DIR       where the log, each step's output and JSON, and summary.md go (default gpu_check/<timestamp>)
#   --device DEV    torch device (default cuda; --device cpu --quick runs the machinery without a GPU)
#   --python PY     the Python to use (default: $PYTHON, else python, else python3)
#   --quick         small benchmark sizes
#   --tests-only / --bench-only
# Environment: BENCH_TIMEOUT  seconds allowed per benchmark (default 3600).
#
# Exit status: 0 all passed; 1 the CUDA tests failed (or no GPU); 2 the tests passed but a benchmark failed.
# Benchmarks listed below run with the flags given there; any other bench/bench_*.py runs with --device (and
# --json when its --help offers it); a listed benchmark whose script is missing is skipped with a note.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
DEVICE=cuda
QUICK=0
RUN_TESTS=1
RUN_BENCH=1
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --tests-only) RUN_BENCH=0; shift ;;
        --bench-only) RUN_TESTS=0; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
LOG=$OUT/gpu_check.log
STATUS=$OUT/status.tsv
: > "$STATUS"

log() { printf '[%s] %s\n' "$(date '+%F %T')" "$*" | tee -a "$LOG"; }

# step NAME LABEL COMMAND...: run it with a timestamped log, its output also in $OUT/NAME.log; record its status
# (LABEL: how the summary shows the command)
step() {
    local name=$1 label=$2; shift 2
    local t0=$SECONDS rc status
    log "START $name: $*"
    timeout --kill-after=60 "${BENCH_TIMEOUT:-3600}" "$@" 2>&1 | tee "$OUT/$name.log" >> "$LOG"
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="failed (exit $rc)" ;; esac
    log "END   $name: $status after $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$label" >> "$STATUS"
    return $rc
}

log "gpu_check: output in $OUT; device $DEVICE; quick=$QUICK"
log "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
"$PY" -c "import torch, open_clip, sys; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| open_clip', open_clip.__version__); print('GPU:', torch.cuda.get_device_name()
if torch.cuda.is_available() else 'none')" 2>&1 | tee -a "$LOG"
command -v nvidia-smi > /dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG"
if [[ $DEVICE == cuda* ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "gpu_check: error: --device $DEVICE but torch sees no CUDA GPU"
    exit 1
fi

tests_rc=0
if [[ $RUN_TESTS == 1 ]]; then
    step tests "pytest tests/test_cuda.py" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT/pytest.xml" || tests_rc=1
fi

# benchmark configurations: NAME|SCRIPT|FLAGS (GPU sizes, then --quick sizes)
if [[ $QUICK == 0 ]]; then
    BENCHES=(
        "prs-ViT-B-16|bench_prs.py|--model ViT-B-16 --batch_size 128 --rounds 5"
        "prs-ViT-H-14|bench_prs.py|--model ViT-H-14 --batch_size 128 --rounds 3 --modes plain,prs,spatial_sum"
        "second_order|bench_second_order.py|--model ViT-B-32 --mlp_layer 9 --images 512 --batch_size 64 --baseline_images 4"
        "segmentation|bench_segmentation.py|--model ViT-B-16 --pretrained none --num_images 512 --batch_size 64 --repeats 3"
        "textspan|bench_textspan.py|--baseline_heads 1 --baseline_iters 10"
        "omp|bench_omp.py|--repeats 2"
        "splice|bench_splice.py|--repeats 3 --active_batch_size 1024"
    )
else
    BENCHES=(
        "prs-ViT-B-32|bench_prs.py|--model ViT-B-32 --batch_size 8 --rounds 2 --no_memory"
        "second_order|bench_second_order.py|--model ViT-B-32 --mlp_layer 9 --images 8 --batch_size 4"
        "segmentation|bench_segmentation.py|--model ViT-B-32 --pretrained none --num_images 8 --batch_size 4 --repeats 1 --classes 100"
        "textspan|bench_textspan.py|--images 2000 --layers 1 --heads 4 --dim 128 --texts 400 --m 8 --rank 16"
        "omp|bench_omp.py|--signals 128 --dim 64 --atoms 3000 --k 16 --sklearn_signals 4 --repeats 1"
        "splice|bench_splice.py|--concepts 3000 --images 32 --repeats 1"
    )
fi

bench_rc=0
if [[ $RUN_BENCH == 1 ]]; then
    known=" "
    for entry in "${BENCHES[@]}"; do
        IFS='|' read -r name script flags <<< "$entry"
        known+="$script "
        if [[ ! -f bench/$script ]]; then
            log "SKIP  $name: bench/$script is not in this checkout"
            printf '%s\t%s\t0\t%s\n' "$name" "skipped: not in this checkout" "bench/$script" >> "$STATUS"
            continue
        fi
        json=()
        "$PY" "bench/$script" --help 2>/dev/null | grep -q -- "--json" && json=(--json "$OUT/$name.json")
        # shellcheck disable=SC2086  # flags are word-split on purpose
        step "$name" "bench/$script $flags --device $DEVICE" "$PY" "bench/$script" $flags --device "$DEVICE" \
            ${json[@]+"${json[@]}"} || bench_rc=2
    done
    for path in bench/bench_*.py; do  # benchmarks added since this list was written
        script=$(basename "$path")
        [[ $known == *" $script "* ]] && continue
        name=${script#bench_}; name=${name%.py}
        json=()
        "$PY" "$path" --help 2>/dev/null | grep -q -- "--json" && json=(--json "$OUT/$name.json")
        log "NOTE  $name: not configured in gpu_check.sh; running it with its defaults and --device $DEVICE"
        step "$name" "$path --device $DEVICE" "$PY" "$path" --device "$DEVICE" ${json[@]+"${json[@]}"} || bench_rc=2
    done
fi

"$PY" bench/gpu_summary.py "$OUT" > "$OUT/summary.md" 2>> "$LOG" || log "gpu_check: could not build the summary table"
log "summary ($OUT/summary.md):"
tee -a "$LOG" < "$OUT/summary.md"
if [[ $tests_rc != 0 ]]; then
    log "gpu_check: FAILED: the CUDA tests failed (see $OUT/tests.log)"
    exit 1
fi
[[ $bench_rc != 0 ]] && log "gpu_check: a benchmark failed (see the table and its log in $OUT)" && exit 2
log "gpu_check: all passed"
exit 0
