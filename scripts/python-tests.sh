#!/usr/bin/env bash
# The Python package's tests against a real PyTorch: Debian's python3-torch (`make deps`
# installs it) seen from a venv (target/python-venv) that also sees the system's packages; the
# package is built and installed with `pip install ./python` (maturin and pytest come from
# PyPI). Ends with pytest's summary line.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
venv=target/python-venv
"$PYTHON" -c 'import torch' || {
    echo "error: $PYTHON has no torch: install Debian's python3-torch (make deps does)" >&2
    exit 1
}
# test_checkpoints.py reads checkpoints that sparse-train writes.
${CARGO:-cargo} build --quiet --locked -p runtime --bin sparse-train
export SPARSEJIT_SPARSE_TRAIN=target/debug/sparse-train
"$PYTHON" -m venv --system-site-packages "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check pytest
# The extension is built with the profile the other suites built (their compiled dependencies
# serve again); a user's `pip install ./python` builds the release profile.
MATURIN_PEP517_ARGS="--profile dev --locked" \
    "$venv/bin/pip" install --quiet --disable-pip-version-check ./python
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q python/tests
