#!/usr/bin/env bash
# The GPU acceptance check of the OpenCL backend (issue 5), for a machine with an NVIDIA GPU
# and possibly no internet access and no Rust toolchain.
#
#   scripts/gpu-check.sh --build [DIR]    (here, with cargo) prepare a bundle in DIR
#                                         (default target/gpu-bundle): the release test
#                                         binaries of the OpenCL differential tests,
#                                         kernel-bench built with --features opencl,
#                                         libOpenCL.so.1 (the ICD loader) and this script
#   DIR/gpu-check.sh [--out OUTDIR]       (there) run it: make the NVIDIA driver visible
#                                         to the loader, run the differential tests and
#                                         kernel-bench --backend opencl --suite gpu, print
#                                         the table of specialised vs csr
#
# Run mode, step by step:
#   1. The ICD loader is the bundle's lib/libOpenCL.so.1 (LD_LIBRARY_PATH), so the machine
#      needs none; the system's is used if the bundle has none.
#   2. If no file in /etc/OpenCL/vendors names the NVIDIA library and libnvidia-opencl.so.1
#      is found (ldconfig, /usr/local/nvidia/lib64, /usr/lib/x86_64-linux-gnu, ...), an ICD
#      file naming it is written: /etc/OpenCL/vendors/nvidia.icd as root (when writable),
#      else a temporary vendors directory (with the system's .icd files too) that
#      OCL_ICD_VENDORS points to. Without the NVIDIA library it goes on with whatever
#      platform exists (PoCL here), so the script can be tested on any machine.
#   3. The device: SPARSEJIT_OPENCL_DEVICE if set, else the first GPU, else the first
#      device. The differential tests run with REQUIRE_OPENCL=1 (no silent skip); they
#      include the convolution ops (conv with each epilogue, conv_t, conv_grad,
#      conv_dense_grad: csr kernels on the named conv cases, random geometries and
#      GPU-shaped code), whose results are listed and must all pass (the tests named
#      conv_*; none run is a failure too).
#   4. kernel-bench --backend opencl --suite gpu: spmm on 1024x1024 and 4096x4096 at 90 %
#      and 95 % sparsity, batch 128; csr, table and unrolled (up to --unrolled-max-nnz,
#      60000 on a GPU), device times without transfers; JSON in OUTDIR/gpu-bench.json.
#   5. kernel-bench --backend opencl --suite conv --filter "$GPU_CHECK_CONV_FILTER" (default
#      "d=5%": every convolution layer and op of the conv suite at 5 %): the csr convolution
#      kernels' device times; JSON in OUTDIR/conv-bench.json.
#
# Environment: GPU_CHECK_BENCH_ARGS adds kernel-bench arguments (e.g. "--budget-ms 200");
# GPU_CHECK_CONV_FILTER picks the convolution cases of step 5 ("none" skips the step);
# GPU_CHECK_SKIP_TESTS=1 runs only the benchmark; GPU_CHECK_NVIDIA_LIB names the driver's
# OpenCL library and GPU_CHECK_VENDORS_DIR the vendors directory (defaults: searched, and
# /etc/OpenCL/vendors; for testing the script elsewhere).
set -euo pipefail

usage() {
    sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

build() {
    local repo bundle
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    bundle="${1:-$repo/target/gpu-bundle}"
    mkdir -p "$bundle"
    bundle="$(cd "$bundle" && pwd)"
    cd "$repo"
    rm -rf "$bundle/bin" "$bundle/tests" "$bundle/lib"
    mkdir -p "$bundle/bin" "$bundle/tests" "$bundle/lib"
    echo "building kernel-bench (release, --features opencl)"
    cargo build --release --locked -p benches --features opencl --bin kernel-bench
    cp target/release/kernel-bench "$bundle/bin/"
    echo "building the OpenCL test binaries (release, --features opencl)"
    local json
    json="$(cargo test --release --locked -p codegen-opencl --features opencl --no-run \
        --message-format=json 2>/dev/null)"
    local name exe
    for name in differential executor probe training_kernels; do
        exe="$(printf '%s\n' "$json" | jq -r --arg n "$name" \
            'select(.reason == "compiler-artifact" and .target.name == $n
                    and (.target.kind | index("test")) and .executable != null)
             | .executable' | tail -n 1)"
        if [ -z "$exe" ] || [ ! -x "$exe" ]; then
            echo "error: no test binary for codegen-opencl's test '$name'" >&2
            exit 1
        fi
        cp "$exe" "$bundle/tests/$name"
    done
    echo "copying the ICD loader"
    local loader
    loader="$( (ldconfig -p 2>/dev/null || true) | awk '/libOpenCL\.so\.1 .*x86-64/ {print $NF; exit}')"
    if [ -z "$loader" ]; then
        for f in /usr/lib/x86_64-linux-gnu/libOpenCL.so.1 /usr/lib64/libOpenCL.so.1 /usr/lib/libOpenCL.so.1; do
            [ -e "$f" ] && loader="$f" && break
        done
    fi
    if [ -z "$loader" ]; then
        echo "error: libOpenCL.so.1 not found (Debian: ocl-icd-libopencl1)" >&2
        exit 1
    fi
    cp -L "$loader" "$bundle/lib/libOpenCL.so.1"
    # debug info makes the binaries ~5x larger; the bundle has to travel
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$bundle"/bin/* "$bundle"/tests/*
    fi
    cp "$repo/scripts/gpu-check.sh" "$bundle/gpu-check.sh"
    chmod +x "$bundle/gpu-check.sh"
    {
        echo "sparsejit GPU check bundle, built $(date -u +%Y-%m-%dT%H:%MZ)"
        echo "commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
        echo "loader $loader"
        echo "run: ./gpu-check.sh [--out OUTDIR]"
    } >"$bundle/BUNDLE.txt"
    echo "bundle ready: $bundle ($(du -sh "$bundle" | cut -f1))"
    ls -l "$bundle" "$bundle/bin" "$bundle/tests" "$bundle/lib"
}

# Prints the path of libnvidia-opencl.so.1, or nothing.
find_nvidia_opencl() {
    local f
    f="$( (ldconfig -p 2>/dev/null || true) | awk '/libnvidia-opencl\.so\.1 .*x86-64/ {print $NF; exit}')"
    if [ -n "$f" ] && [ -e "$f" ]; then
        echo "$f"
        return
    fi
    for f in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu \
        /usr/lib64 /usr/lib /usr/local/cuda/lib64 /usr/local/cuda/compat; do
        if [ -e "$f/libnvidia-opencl.so.1" ]; then
            echo "$f/libnvidia-opencl.so.1"
            return
        fi
    done
    f="$(find / -xdev -name 'libnvidia-opencl.so.1' -not -path '/proc/*' 2>/dev/null | head -n 1 || true)"
    [ -n "$f" ] && echo "$f"
    return 0
}

setup_icd() {
    local lib="$1" vendors="${GPU_CHECK_VENDORS_DIR:-/etc/OpenCL/vendors}"
    if [ -z "$lib" ]; then
        echo "icd: no libnvidia-opencl.so.1 on this machine; using the platforms already installed"
        return
    fi
    if [ -n "${OCL_ICD_VENDORS:-}" ]; then
        echo "icd: OCL_ICD_VENDORS=$OCL_ICD_VENDORS is set; leaving it"
        return
    fi
    if grep -qs -F "$(basename "$lib")" "$vendors"/*.icd; then
        echo "icd: $(grep -ls -F "$(basename "$lib")" "$vendors"/*.icd | head -n 1) already names the NVIDIA driver"
        return
    fi
    if [ "$(id -u)" = 0 ] && mkdir -p "$vendors" 2>/dev/null && echo "$lib" >"$vendors/nvidia.icd" 2>/dev/null; then
        echo "icd: wrote $vendors/nvidia.icd -> $lib"
        # the loader reads /etc/OpenCL/vendors unless told otherwise
        if [ "$vendors" != /etc/OpenCL/vendors ]; then export OCL_ICD_VENDORS="$vendors"; fi
        return
    fi
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-icd.XXXXXX")"
    cp "${GPU_CHECK_VENDORS_DIR:-/etc/OpenCL/vendors}"/*.icd "$dir/" 2>/dev/null || true
    echo "$lib" >"$dir/nvidia.icd"
    # shellcheck disable=SC2064 # expand $dir now
    trap "rm -rf '$dir'" EXIT
    export OCL_ICD_VENDORS="$dir"
    echo "icd: not root (or $vendors not writable): OCL_ICD_VENDORS=$dir (nvidia.icd -> $lib)"
}

run() {
    local here out
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    out="$here/out"
    while [ $# -gt 0 ]; do
        case "$1" in
        --out) out="$2"; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 1 ;;
        esac
    done
    for f in bin/kernel-bench tests/differential tests/executor tests/probe tests/training_kernels; do
        if [ ! -x "$here/$f" ]; then
            echo "error: $here/$f is missing: make the bundle with scripts/gpu-check.sh --build DIR" >&2
            exit 1
        fi
    done
    mkdir -p "$out"
    if [ -e "$here/lib/libOpenCL.so.1" ]; then
        export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "loader: $here/lib/libOpenCL.so.1 (bundled)"
    else
        echo "loader: the system's libOpenCL.so.1"
    fi
    [ -f "$here/BUNDLE.txt" ] && sed 's/^/bundle: /' "$here/BUNDLE.txt"
    setup_icd "${GPU_CHECK_NVIDIA_LIB:-$(find_nvidia_opencl)}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
            sed 's/^/gpu: /' || true
    fi
    export REQUIRE_OPENCL=1
    local status=0
    if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
        local t
        for t in probe executor differential training_kernels; do
            echo "== test $t"
            "$here/tests/$t" 2>&1 | tee "$out/test-$t.log" |
                grep -E '^(test result|OpenCL device|conv \(|.*FAILED|.*panicked)' || true
            if ! grep -q '^test result: ok' "$out/test-$t.log"; then
                echo "== test $t FAILED (log: $out/test-$t.log)"
                status=1
            fi
        done
        echo "== convolution ops (differential tests conv_*)"
        local conv
        conv="$(grep -E '^test conv_[a-z_]+ \.\.\. ' "$out/test-differential.log" || true)"
        printf '%s\n' "${conv:-(none ran)}"
        if [ -z "$conv" ] || printf '%s\n' "$conv" | grep -qv ' \.\.\. ok$'; then
            echo "== convolution tests FAILED or missing (log: $out/test-differential.log)"
            status=1
        fi
    fi
    echo "== kernel-bench --backend opencl --suite gpu"
    # shellcheck disable=SC2086 # GPU_CHECK_BENCH_ARGS is a list of arguments
    if ! "$here/bin/kernel-bench" --backend opencl --suite gpu --json "$out/gpu-bench.json" \
        ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$out/gpu-bench.log"; then
        echo "== kernel-bench FAILED (log: $out/gpu-bench.log)"
        status=1
    fi
    local conv_filter="${GPU_CHECK_CONV_FILTER:-d=5%}"
    if [ "$conv_filter" != none ]; then
        echo "== kernel-bench --backend opencl --suite conv --filter '$conv_filter'"
        # shellcheck disable=SC2086 # GPU_CHECK_BENCH_ARGS is a list of arguments
        if ! "$here/bin/kernel-bench" --backend opencl --suite conv --filter "$conv_filter" \
            --json "$out/conv-bench.json" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 |
            tee "$out/conv-bench.log"; then
            echo "== kernel-bench (convolutions) FAILED (log: $out/conv-bench.log)"
            status=1
        fi
    fi
    echo
    echo "== GPU acceptance table (target: specialised >= 2x csr on a GPU)"
    sed -n '/^opencl: /p' "$out/gpu-bench.log"
    sed -n '/^specialised vs csr/,/^total/p' "$out/gpu-bench.log" | grep -v '^total' || true
    echo "logs and JSON: $out"
    if [ "$status" != 0 ]; then
        echo "gpu-check: FAILED (see above)"
    else
        echo "gpu-check: differential tests (convolutions included) and benchmark passed"
    fi
    return "$status"
}

case "${1:-}" in
--build) shift; build "$@" ;;
-h | --help) usage 0 ;;
*) run "$@" ;;
esac
