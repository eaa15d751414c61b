# certrotator build entry points. `make test` from a clean clone creates .venv, installs the project with
# its test extras (plus SoftHSM2 for the PKCS#11 tests), runs ruff + mypy, then the whole pytest suite.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOFTHSM_MODULE := /usr/lib/softhsm/libsofthsm2.so
# Only the source folders that exist (bench/ arrives with the benchmark).
LINT_PATHS := $(wildcard src tests bench infra)

.PHONY: venv softhsm lint test demo clean

venv: $(STAMP) softhsm

# Re-installs only when the project's metadata changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "error: $(PYTHON) is $$($(PYTHON) -V 2>&1); certrotator needs Python >= 3.11 (make PYTHON=python3.11 ...)" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,infra]'
	@touch $@

# SoftHSM2 backs the PKCS#11 key-store tests. Installed with apt when missing; never fatal when it cannot be.
softhsm:
	@if [ -e "$(SOFTHSM_MODULE)" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "warning: $(SOFTHSM_MODULE) is missing and apt-get is not available: install SoftHSM2 yourself;" \
	       "the PKCS#11 tests need it." >&2; exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then SUDO=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "warning: $(SOFTHSM_MODULE) is missing and installing it needs root:" \
	          "run 'sudo apt-get install -y softhsm2'; the PKCS#11 tests need it." >&2; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then $$SUDO apt-get update -qq; fi; \
	if ! $$SUDO apt-get install -y -qq softhsm2; then \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq softhsm2; fi; \
	test -e "$(SOFTHSM_MODULE)" || { echo "error: softhsm2 installed but $(SOFTHSM_MODULE) is missing" >&2; exit 1; }

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy

test: venv lint
	$(BIN)/pytest -q

demo: venv
	$(BIN)/certrotator demo

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
