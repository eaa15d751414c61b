# certrotator build entry points. `make test` from a clean clone creates .venv, installs the project with
# its test extras at the versions of constraints.txt (plus SoftHSM2 for the PKCS#11 tests), runs ruff + mypy,
# then the whole pytest suite; then the device and end-to-end tests again on Python 3.10, the oldest Python
# we support (Ubuntu 22.04's python3, the commonest Greengrass host), in .venv310.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
# The lock: exact versions for every supported Python (pyproject.toml has ranges).
CONSTRAINTS := constraints.txt
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Python 3.10 leg: what runs on a device, and the end-to-end tests that drive it. PYTHON310 overrides
# the search (python3.10 on PATH if it runs, else pyenv's newest 3.10).
PYTHON310 ?=
VENV310 := .venv310
BIN310 := $(VENV310)/bin
STAMP310 := $(VENV310)/.installed
TESTS310 := tests/device tests/e2e tests/test_protocol.py tests/test_crypto.py
SOFTHSM_MODULE := /usr/lib/softhsm/libsofthsm2.so
# Only the source folders that exist (bench/ arrives with the benchmark).
LINT_PATHS := $(wildcard src tests bench infra)

.PHONY: venv softhsm lint test test-main test-py310 demo clean

venv: $(STAMP) softhsm

# Re-installs only when the project's metadata or the lock changes.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo "error: $(PYTHON) is $$($(PYTHON) -V 2>&1); certrotator needs Python >= 3.10 (make PYTHON=python3.12 ...)" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test,infra]'
	@touch $@

# The 3.10 venv: the test extra (it holds the device and local ones), not the CDK (infra) one.
$(STAMP310): pyproject.toml $(CONSTRAINTS)
	@test -n "$(PYTHON310)" || { echo "error: PYTHON310 is not set ('make test-py310' finds one)" >&2; exit 1; }
	$(PYTHON310) -m venv $(VENV310)
	$(BIN310)/python -m pip install --quiet --upgrade pip
	$(BIN310)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	@touch $@

# Prints the path of a Python 3.10 that can make a venv, or nothing. pyenv's shims refuse a version that is
# not selected, hence PYENV_VERSION (and the check that a candidate really runs).
define find_python310
usable() { "$$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; }; \
for candidate in $(PYTHON310) python3.10; do \
  if usable "$$candidate"; then command -v "$$candidate"; exit 0; fi; done; \
if command -v pyenv >/dev/null 2>&1; then \
  version="$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.10\.[0-9]+$$' | sort -t. -k3,3n | tail -n 1)"; \
  if [ -n "$$version" ]; then \
    candidate="$$(PYENV_VERSION="$$version" pyenv which python3.10 2>/dev/null)" && usable "$$candidate" && echo "$$candidate"; fi; fi; \
exit 0
endef

# Debian packages the tests use, installed with apt when missing; never fatal when they cannot be.
# $(call apt_package,PACKAGE,SHELL TEST THAT IT IS THERE,WHAT NEEDS IT)
define apt_package
	@if $(2); then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "warning: $(1) is missing and apt-get is not available: install it yourself; $(3)." >&2; exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then SUDO=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "warning: $(1) is missing and installing it needs root:" \
	          "run 'sudo apt-get install -y $(1)'; $(3)." >&2; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then $$SUDO apt-get update -qq; fi; \
	if ! $$SUDO apt-get install -y -qq $(1); then \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(1); fi; \
	$(2) || { echo "error: $(1) installed but not found" >&2; exit 1; }
endef

# SoftHSM2 backs the PKCS#11 key-store tests; libfaketime runs the fault matrix's clock-skewed devices.
softhsm:
	$(call apt_package,softhsm2,test -e "$(SOFTHSM_MODULE)",the PKCS#11 tests need it)
	$(call apt_package,libfaketime,compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null,the clock-skew fault tests need it)

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy

test: test-main test-py310

test-main: venv lint
	@start=$$SECONDS; $(BIN)/pytest -q; echo "main leg ($$($(BIN)/python -V)): $$((SECONDS - start)) s"

# No Python 3.10 here: a loud warning, and this leg is skipped (not failed).
test-py310: softhsm
	@start=$$SECONDS; python310="$$( ( $(find_python310) ) )"; \
	if [ -z "$$python310" ]; then \
	  echo "" >&2; \
	  echo "######################################################################################" >&2; \
	  echo "# WARNING: no usable Python 3.10 (python3.10 on PATH or in pyenv; or set PYTHON310)," >&2; \
	  echo "# so the device and end-to-end tests did NOT run on Python 3.10. SKIPPED." >&2; \
	  echo "######################################################################################" >&2; \
	  echo "" >&2; exit 0; fi; \
	if [ -e $(STAMP310) ] && ! $(BIN310)/python -c '' >/dev/null 2>&1; then rm -f $(STAMP310); fi; \
	$(MAKE) --no-print-directory PYTHON310="$$python310" $(STAMP310); \
	$(BIN310)/pytest -q -p no:cacheprovider $(TESTS310); \
	echo "Python 3.10 leg ($$($(BIN310)/python -V), $$python310): $$((SECONDS - start)) s"

demo: venv
	$(BIN)/certrotator demo

clean:
	rm -rf $(VENV) $(VENV310) build dist .pytest_cache .mypy_cache .ruff_cache
	find . -path ./.git -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
