#!/usr/bin/env bash
# Runs every test suite of the project (what `make test` runs, after installing the Debian
# packages the OpenCL, MPI and Python tests need) and ends with one line: N passed, N failed, N skipped
# (skipped = ignored tests). A suite that fails to build or fails a test makes the exit status
# non-zero; every test binary of every suite still runs (--no-fail-fast), so the counts are
# whole.
set -u
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
log=$(mktemp)
trap 'rm -f "$log" "$log.failed"' EXIT
status=0

suite() {
    echo "+ $CARGO $*"
    "$CARGO" "$@" 2>&1 | tee -a "$log"
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
        status=1
        echo "FAILED: $CARGO $*" >>"$log.failed"
    fi
}

suite test --workspace --locked --no-fail-fast
suite test -p codegen-opencl --features opencl --locked --no-fail-fast
suite test -p runtime --features opencl --locked --no-fail-fast --test opencl_training
suite test -p runtime --features mpi --locked --no-fail-fast --test distributed
suite test -p benches --features opencl --locked --no-fail-fast --lib

# The Python package's tests (pytest; see scripts/python-tests.sh).
PYTHON_TESTS=${PYTHON_TESTS:-scripts/python-tests.sh}
echo "+ $PYTHON_TESTS"
"$PYTHON_TESTS" 2>&1 | tee -a "$log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    status=1
    echo "FAILED: $PYTHON_TESTS" >>"$log.failed"
fi

if [ -f "$log.failed" ]; then
    echo
    cat "$log.failed"
    rm -f "$log.failed"
fi
# cargo's per-binary lines: "test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; ..."
# and pytest's last line: "3 failed, 120 passed, 1 skipped, 2 errors in 4.21s".
awk '$1 == "test" && $2 == "result:" { p += $4; f += $6; s += $8 }
     /^[0-9]+ (passed|failed|skipped|errors?)/ && / in [0-9.]+s/ {
         for (i = 2; i <= NF; i++) {
             n = $(i - 1) + 0; w = $i; sub(/[,=]+$/, "", w)
             if (w == "passed") p += n
             else if (w == "failed" || w == "error" || w == "errors") f += n
             else if (w == "skipped") s += n
         }
     }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
