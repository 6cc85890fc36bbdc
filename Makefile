# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-avx2 docs docs-serve install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files so a second `make` does not reinstall; they are rebuilt when the pins change.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/pldr demo

test: $(VENV)/.installed-dev
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The parity tests again with the kernels of a CPU without AVX-512 (PyTorch and MKL both
# pick their code path from these variables), so a tolerance that holds on one CPU family only
# fails here rather than on a newcomer's machine.
test-avx2: $(VENV)/.installed-dev
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 \
		$(BIN)/python -m pytest -q -m parity

# The documentation site (mkdocs.yml, docs/): built into site/; --strict turns a broken link,
# a missing page or a docstring the API reference cannot render into an error.
docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

clean:
	rm -rf $(VENV) build site src/*.egg-info
