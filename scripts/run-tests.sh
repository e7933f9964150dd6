#!/usr/bin/env bash
# Runs every test suite of the project (what `make test` runs, after installing the Debian
# packages the OpenCL tests need) and ends with one line: N passed, N failed, N skipped
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
suite test -p benches --features opencl --locked --no-fail-fast --lib

if [ -f "$log.failed" ]; then
    echo
    cat "$log.failed"
    rm -f "$log.failed"
fi
# cargo's per-binary lines: "test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; ..."
awk '$1 == "test" && $2 == "result:" { p += $4; f += $6; s += $8 }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
