# The two commands a fresh clone needs: `make train` (the main job) and `make test`.

# Debian packages the tests need: OpenCL headers/loader and PoCL (the CPU OpenCL platform);
# OpenMPI and libclang (the mpi crate's bindings generator) for distributed training;
# PyTorch (CPU) and venv for the Python package's tests.
DEB_PACKAGES := ocl-icd-opencl-dev pocl-opencl-icd openmpi-bin libopenmpi-dev libclang-dev \
	python3-torch python3-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CARGO ?= cargo

.PHONY: test train deps check fmt clippy

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# LeNet-300-100 at 5 % density on the vendored MNIST, the reference's settings (10 epochs;
# pass e.g. ARGS="--epochs 100" for the paper's run).
ARGS ?=
train:
	$(CARGO) run --release --locked -p runtime --bin sparse-train -- $(ARGS)

# Every test suite, ending with one line: N passed, N failed, N skipped.
test: deps
	CARGO="$(CARGO)" scripts/run-tests.sh

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

check: fmt clippy test
