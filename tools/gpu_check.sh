#!/usr/bin/env bash
# One GPU check of kvcourse, as one command on a lent GPU machine (see docs/gpu-check.md):
#   1. the card and the Python stack (nvidia-smi, torch, transformers), the carried wheels installed;
#   2. the package tests that matter on a GPU (fast path, static shapes and CUDA graphs, caches, bench);
#   3. python -m kvcourse.bench --gpu-quick (SmolLM2-1.7B shape, bf16, CUDA graphs), rows printed as they finish;
#   4. the solution notebooks under nbval (needs the carried Jupyter wheels).
# Every step runs under its own time limit, and the whole under TOTAL_S, so the script ends (and its
# files come back) before the device tool's limit. Logs are written to $OUT as each step runs, so a
# run cut off still leaves what it had.
#
# Environment (all optional): OUT (default /tmp/kvcourse-gpu-check), PYTHON (python3), TOTAL_S (420),
# PKG_S (90), BENCH_S (210), NBVAL_S (180), BENCH_ARGS ("--gpu-quick"), PKG_TESTS (the list below),
# WHEELS (.whl: a folder of wheels to install first; huggingface_hub is left out, see the docs).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/kvcourse-gpu-check}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-420}
WORK=/tmp/kvcourse-gpu-work
WHEELS=${WHEELS:-.whl}
PKG_TESTS=${PKG_TESTS:-tests/test_fast.py tests/test_static.py tests/test_cache.py tests/test_llama.py tests/test_generate.py tests/test_bench_live.py tests/test_api_errors.py}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
START=$SECONDS
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: run COMMAND with stdout and stderr in $OUT/NAME.log, under the smaller of
# LIMIT_S and the time the whole script has left; record its exit code and duration in summary.txt.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        note "$name: skipped, $left s left of TOTAL_S=$TOTAL_S"
        return 0
    fi
    local t0=$SECONDS
    echo "== $name (limit $limit s): $*" > "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    local why=""
    ((rc == 124 || rc == 137)) && why=" (time limit reached: the log has what it printed until then)"
    note "$name: exit $rc in $((SECONDS - t0)) s, limit $limit s$why"
    tail -n 25 "$OUT/$name.log"
    return 0
}

# 1. the machine and the stack
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    nvidia-smi | head -15
    git rev-parse --short HEAD 2>/dev/null || echo "(no git here)"
    if [ -d "$WHEELS" ]; then
        # huggingface_hub 2.x needs httpx2, which the GPU machine lacks; its own huggingface_hub (1.3x)
        # satisfies transformers 5.x, so that wheel is left out.
        mapfile -t wheels < <(ls "$WHEELS"/*.whl 2>/dev/null | grep -v '/huggingface_hub-')
        echo "installing ${#wheels[@]} wheels from $WHEELS into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}" 2>&1 | tail -5
    else
        echo "no $WHEELS folder: no wheels installed (nbval needs them, see docs/gpu-check.md)"
    fi
} > "$OUT/smi.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" - >> "$OUT/smi.txt" 2>&1 <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "free/total bytes:", torch.cuda.mem_get_info())
for name in ["transformers", "tokenizers", "huggingface_hub", "nbval", "ipykernel", "nbformat"]:
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as err:  # noqa: BLE001 - report and go on
        print(name, "NOT IMPORTABLE:", type(err).__name__, err)
PYEOF
cat "$OUT/smi.txt"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "no CUDA device: stopping (this check is for a GPU machine; on a CPU run make test and --quick)"
    exit 2
fi
if ! "$PY" -c "import kvcourse.bench, transformers" >> "$OUT/smi.txt" 2>&1; then
    note "kvcourse.bench or transformers does not import: see smi.txt (a carried wheel may need a package)"
    tail -n 20 "$OUT/smi.txt"
    exit 3
fi

# 2. the package tests that exercise the GPU paths (CUDA-only tests run here and are skipped on CPU);
#    a listed test file that this checkout does not have is left out
pkg_args=()
for arg in $PKG_TESTS; do
    [[ $arg == tests/*.py && ! -e $arg ]] && continue
    pkg_args+=("$arg")
done
step pkg "${PKG_S:-90}" "$PY" -m pytest -p no:cacheprovider -q -x -rs "${pkg_args[@]}"

# 3. the benchmark's GPU preset: each row printed as it finishes; outputs in $WORK/bench
# shellcheck disable=SC2086
step bench "${BENCH_S:-210}" "$PY" -m kvcourse.bench ${BENCH_ARGS:---gpu-quick} --out "$WORK/bench" --no-progress
[ -f "$WORK/bench/bench.md" ] && cp "$WORK/bench/bench.md" "$OUT/bench.md"

# 4. the solution notebooks under nbval, in this environment
if "$PY" -c "import nbval, ipykernel" 2>/dev/null; then
    step nbval "${NBVAL_S:-180}" "$PY" -m pytest -p no:cacheprovider -q --nbval-lax --nbval-current-env solutions/
else
    note "nbval: skipped, nbval/ipykernel not importable (carry the wheels: docs/gpu-check.md)"
fi

# everything else (bench.json, the plots) in one archive: the device tool brings back at most 8 files
tar czf "$OUT/results.tgz" -C "$WORK" . 2>/dev/null
note "total: $((SECONDS - START)) s of TOTAL_S=$TOTAL_S; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
