#!/usr/bin/env bash
# gpu-check.sh: build dynsnap and run its GPU suite and GPU benches on a GPU machine without package access.
#
# Run from the repo root on the GPU machine, with .gpubundle/ (from scripts/gpu-bundle.sh) carried along:
#   scripts/gpu-check.sh [setup] [tests] [bench [SIZES]] [io] [memfd] [weights [SIZES]] [e2e [MODEL]]
#   (no argument: setup tests bench; e2e: `dynsnap bench e2e` for MODEL, default qwen3-0.6b, with its plot)
# SIZES is a comma list of GB (default 1,4,16, or $DYNSNAP_BENCH_SIZES). $DYNSNAP_GPU_TESTS narrows the tests step
# (pytest paths), $DYNSNAP_E2E_ROWS the e2e rows (see `dynsnap bench e2e --rows`). Results go to $OUT (default
# /tmp/dynsnap-gpu-out): build.log, gpu-tests.log, bench-gpu.json, bench-gpu.log, bench-weights.json,
# gpu-facts.jsonl, summary.md. Uses the machine's python3 (torch, cuda-bindings preinstalled); setup always runs
# first (idempotent): build, then kvikio, CRIU and the driver are reported. Exits non-zero when the build, any GPU
# test or any benchmark fails; the last thing printed is a Markdown summary to paste into benches/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/dynsnap-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SIZES=${DYNSNAP_BENCH_SIZES:-1,4,16}

want_tests=0 want_bench=0 want_io=0 want_memfd=0 want_weights=0 want_e2e=0
E2E_MODEL=qwen3-0.6b
WSIZES=${DYNSNAP_WEIGHTS_SIZES:-1.2,16}
if [[ $# -eq 0 ]]; then want_tests=1; want_bench=1; fi
while [[ $# -gt 0 ]]; do
    case "$1" in
        setup) ;;
        io) want_io=1 ;;
        memfd) want_memfd=1 ;;
        weights)
            want_weights=1
            if [[ "${2:-}" =~ ^[0-9.,]+$ ]]; then WSIZES=$2; shift; fi ;;
        tests|test) want_tests=1 ;;
        e2e)
            want_e2e=1
            if [[ "${2:-}" =~ ^(qwen3-0.6b|qwen3-8b|tiny)$ ]]; then E2E_MODEL=$2; shift; fi ;;
        bench|benches)
            want_bench=1
            if [[ "${2:-}" =~ ^[0-9.,]+$ ]]; then SIZES=$2; shift; fi ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (setup | tests | bench [SIZES] | io | memfd | weights [SIZES] | e2e [MODEL])" >&2; exit 2 ;;
    esac
    shift
done

summary=()
note() { summary+=("$1"); echo "gpu-check: $1"; }

# ---- setup: CRIU prefix, environment, in-place build ---------------------------------------------------
BUNDLE=$REPO/.gpubundle
if [[ ! -d "$BUNDLE" ]]; then
    echo "gpu-check: $BUNDLE is missing: run scripts/gpu-bundle.sh here first and carry .gpubundle" >&2
    exit 1
fi
if [[ ! -x /opt/dynsnap/criu/bin/criu ]]; then
    mkdir -p /opt/dynsnap
    tar -C /opt/dynsnap -xzf "$BUNDLE/criu.tar.gz"
fi
export DYNSNAP_CRIU=/opt/dynsnap/criu/bin/criu
export DYNSNAP_DEPS_PREFIX=$BUNDLE/deps
export LD_LIBRARY_PATH=$BUNDLE/deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# fio built by gpu-bundle.sh: the device-limit rows of `bench io`
[[ -x "$BUNDLE/bin/fio" ]] && export DYNSNAP_FIO=$BUNDLE/bin/fio

# kvikio wheels from gpu-bundle.sh, installed without dependencies (cupy, numpy, cufile are in the image)
if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null && ! $PY -c 'import kvikio' 2>/dev/null; then
    PYLIB=/tmp/dynsnap-pylib
    if $PY -m pip install -q --no-deps --no-index --target "$PYLIB" "$BUNDLE"/wheels/*.whl >"$OUT/kvikio-install.log" 2>&1; then
        export PYTHONPATH=$PYTHONPATH:$PYLIB
    else
        note "kvikio wheels: install failed ($(tail -1 "$OUT/kvikio-install.log"))"
    fi
fi

echo "gpu-check: host $(hostname), $(nproc) cores, kernel $(uname -r), $($PY --version 2>&1)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu-check: GPU /'

rc_build=0
if $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    note "build: ok"
else
    rc_build=1
    note "build: FAILED (tail of $OUT/build.log below)"
    tail -30 "$OUT/build.log"
fi
kv=$($PY -c 'from dynsnap_core.weights import loader as w
k = w._kvikio()
mode = ("compat mode" if w._kvikio_compat(k) else "GDS") if k else ""
print(k.__version__ + " (" + mode + ")" if k else "not installed")' 2>&1 | tail -1)
note "kvikio: $kv"

criu_ver=$("$DYNSNAP_CRIU" --version 2>&1 | head -1)
if "$DYNSNAP_CRIU" check >"$OUT/criu-check.log" 2>&1; then
    note "criu check: ok ($criu_ver)"
else
    note "criu check: FAILED ($criu_ver): $(tail -1 "$OUT/criu-check.log")"
fi
$PY -m dynsnap_core.cli doctor 2>&1 | tee "$OUT/doctor.log" || note "doctor: exited non-zero"
$PY - <<'PYEOF' 2>&1 | tee -a "$OUT/doctor.log"
import dynsnap_core.cuda as c
print("gpu-check: cuda driver_info", c.driver_info())
if c.is_available():
    for d in c.devices():
        print("gpu-check: device", d)
PYEOF

# ---- tests ----------------------------------------------------------------------------------------------
rc_tests=0
if [[ $want_tests == 1 ]]; then
    export DYNSNAP_GPU_FACTS=$OUT/gpu-facts.jsonl
    : >"$DYNSNAP_GPU_FACTS"
    # shellcheck disable=SC2086 - DYNSNAP_GPU_TESTS is a list of test paths (default: the whole GPU suite)
    $PY -m pytest -m gpu ${DYNSNAP_GPU_TESTS:-tests/gpu} -v --timeout 300 -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu-tests.log"
    rc_tests=${PIPESTATUS[0]}
    note "tests: rc $rc_tests, $(grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$OUT/gpu-tests.log" | tail -1 | tr -d '=' | xargs)"
fi

# ---- benches --------------------------------------------------------------------------------------------
rc_bench=0
if [[ $want_bench == 1 ]]; then
    $PY benches/bench_gpu.py --sizes "$SIZES" --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log"
    rc_bench=${PIPESTATUS[0]}
    note "bench: rc $rc_bench, sizes $SIZES GB, $OUT/bench-gpu.json"
fi

if [[ $want_io == 1 ]]; then
    # DYNSNAP_IO_SWEEP=1 (default here) adds the block size x queue depth table
    DYNSNAP_IO_SWEEP=${DYNSNAP_IO_SWEEP:-1} \
    $PY -m dynsnap_core.cli bench io --dir /var/tmp --size-mb "${DYNSNAP_IO_MB:-4096}" 2>&1 | tee "$OUT/bench-io.txt"
    note "bench io: rc ${PIPESTATUS[0]}, $OUT/bench-io.txt"
fi
if [[ $want_memfd == 1 ]]; then
    # The fill with 2 MiB pages needs shmem THP allowed (advise) and, for the hugetlb rows, reserved pages:
    # switched on for this run only and put back afterwards (DYNSNAP_MEMFD_MB x 2 MiB pages + slack).
    MB=${DYNSNAP_MEMFD_MB:-8192}
    thp_knob=/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled
    [[ -e $thp_knob ]] || thp_knob=/sys/kernel/mm/transparent_hugepage/shmem_enabled
    old_thp=$(sed 's/.*\[\(.*\)\].*/\1/' "$thp_knob" 2>/dev/null || true)
    old_huge=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
    echo advise > "$thp_knob" 2>/dev/null || note "bench memfd: cannot allow shmem THP ($thp_knob)"
    echo $(( old_huge + MB / 2 + 64 )) > /proc/sys/vm/nr_hugepages 2>/dev/null || note "bench memfd: cannot reserve hugetlb pages"
    cold_flag=(--no-cold)                       # DYNSNAP_MEMFD_COLD=1 adds the drop_caches rows
    [[ -n ${DYNSNAP_MEMFD_COLD:-} ]] && cold_flag=()
    $PY -m dynsnap_core.cli bench memfd --size-mb "$MB" --dir /var/tmp "${cold_flag[@]}" 2>&1 | tee "$OUT/bench-memfd.txt"
    note "bench memfd: rc ${PIPESTATUS[0]}, $OUT/bench-memfd.txt"
    [[ -n $old_thp ]] && echo "$old_thp" > "$thp_knob" 2>/dev/null
    echo "$old_huge" > /proc/sys/vm/nr_hugepages 2>/dev/null || true
fi

rc_weights=0
if [[ $want_weights == 1 ]]; then
    $PY -m dynsnap_core.cli bench weights --sizes "$WSIZES" --json >"$OUT/bench-weights.json" 2>"$OUT/bench-weights.log"
    rc_weights=$?
    $PY - "$OUT/bench-weights.json" <<'PYEOF' >"$OUT/bench-weights.txt" 2>&1 || rc_weights=1
import json, sys
from dynsnap_core.bench import weights as bench_weights
res = json.load(open(sys.argv[1]))
print(bench_weights.format_table(res))
bad = [r for r in res["rows"] if "error" in r or r.get("bit_exact") is False]
sys.exit(1 if bad else 0)
PYEOF
    cat "$OUT/bench-weights.txt"
    note "bench weights: rc $rc_weights, sizes $WSIZES GB, $OUT/bench-weights.txt"
fi

rc_e2e=0
if [[ $want_e2e == 1 ]]; then
    $PY -m dynsnap_core.cli bench e2e --model "$E2E_MODEL" --json --plot "$OUT/e2e-$E2E_MODEL.png" \
        ${DYNSNAP_E2E_ROWS:+--rows "$DYNSNAP_E2E_ROWS"} \
        >"$OUT/bench-e2e.json" 2>"$OUT/bench-e2e.log"
    rc_e2e=$?
    $PY - "$OUT/bench-e2e.json" <<'PYEOF' >"$OUT/bench-e2e.txt" 2>&1 || rc_e2e=1
import json, sys
from dynsnap_core.bench import e2e as bench_e2e
res = json.load(open(sys.argv[1]))
print(bench_e2e.format_table(res))
sys.exit(0 if all(r.get("tokens_match") for r in res["rows"]) else 1)
PYEOF
    cat "$OUT/bench-e2e.txt"
    note "bench e2e: rc $rc_e2e, $E2E_MODEL, $OUT/bench-e2e.txt, $OUT/e2e-$E2E_MODEL.png"
fi

# ---- short table last: Markdown, to paste into benches/RESULTS.md ----------------------------------------
{
    echo
    echo "== dynsnap gpu-check summary =="
    echo
    echo "$(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1),"\
         "$(nproc) cores, kernel $(uname -r), CRIU ${criu_ver#Version: }, kvikio $kv"
    echo
    echo '| step | result |'
    echo '|---|---|'
    for line in "${summary[@]}"; do
        printf '| %s | %s |\n' "${line%%:*}" "${line#*: }"
    done
    if [[ $want_tests == 1 ]]; then
        failed=$(grep -E '^(FAILED|ERROR) ' "$OUT/gpu-tests.log" | sed 's/^/    /')
        [[ -n $failed ]] && { echo; echo 'Failed GPU tests:'; echo; echo "$failed"; }
        if [[ -s "$OUT/gpu-facts.jsonl" ]]; then
            echo; echo 'Facts measured by the GPU tests:'; echo
            sed 's/^/    /' "$OUT/gpu-facts.jsonl"
        fi
    fi
    if [[ $want_bench == 1 && -s "$OUT/bench-gpu.log" ]]; then
        echo; sed -n '/^== table ==/,$p' "$OUT/bench-gpu.log" | sed 's/^/    /'
    fi
    if [[ $want_weights == 1 && -s "$OUT/bench-weights.json" ]]; then
        echo
        $PY - "$OUT/bench-weights.json" <<'PYEOF'
import json, sys
from dynsnap_core.bench import weights as bench_weights
print(bench_weights.format_markdown(json.load(open(sys.argv[1]))))
PYEOF
    fi
    if [[ $want_e2e == 1 && -s "$OUT/bench-e2e.txt" ]]; then
        echo; sed -n '/^== table ==/,$p' "$OUT/bench-e2e.txt" | sed 's/^/    /'
    fi
} | tee "$OUT/summary.md"
[[ $rc_build == 0 && $rc_tests == 0 && $rc_bench == 0 && $rc_weights == 0 && $rc_e2e == 0 ]]
