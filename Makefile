# Everything a fresh Debian machine with only Python needs: `make test`, `make demo`.
# The venv holds every role (guest, bridge, tools) and the test tools; a VM needs only
# `pip install tvdnet` (docs/deploying.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict src/tvdnet src/device_bridge src/tvdnet_tools tests
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/tvdnet demo

bench: $(STAMP)
	$(BIN)/python benchmarks/core.py

# Three real QEMU guests (TCG), the real bridge, real virtio-serial ports (needs root;
# installs QEMU, a kernel and busybox with apt when they are missing); then a TVD on two
# hosts (network namespaces) with a guest live-migrated from one to the other.
e2e: $(STAMP)
	$(BIN)/python e2e/run.py
	$(BIN)/python e2e/migrate.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
