# The README's two commands: `make run` and `make test`. Both set up what they need first
# (a .venv with the Python dependencies, node_modules with solc-js, OpenZeppelin and anvil);
# set-up is skipped when pyproject.toml / package-lock.json have not changed since the last one.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
PYTEST_ARGS ?=
# The embedded chain node (`ledger/geth.py`): go-ethereum, built once from the Go module proxy into the
# virtualenv (a few minutes the first time; the module cache keeps it for later builds).
GETH_VERSION := v1.17.10
GETH_STAMP := $(VENV)/.geth-$(GETH_VERSION)

.PHONY: setup system-deps run test lint format bench clean

setup: $(PY_STAMP) $(NPM_STAMP) $(GETH_STAMP) system-deps

# System packages the tests use, installed where missing (as root, as CI runs): PostgreSQL's server
# binaries (the vault is tested on a real PostgreSQL as well as on SQLite) and Debian's Chromium (the
# portal's end-to-end tests drive it with Playwright; Playwright's own browser download is not used) and wrk
# (the benchmarks' load generator: C, so that the client takes little of the cores the service is measured on).
SYSTEM_PACKAGES := $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql) $(if $(wildcard /usr/bin/chromium),,chromium) $(if $(wildcard /usr/bin/wrk),,wrk)
system-deps:
	@if [ -n "$(strip $(SYSTEM_PACKAGES))" ]; then \
	  echo "installing $(strip $(SYSTEM_PACKAGES))"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; fi

$(PY_STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

$(NPM_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "Node.js and npm are required: apt-get install nodejs npm"; exit 1; }
	# `npm ci`: exactly the lock file, which it never rewrites. The lock lists every platform's optional
	# anvil package (as npm writes it); only this platform's is downloaded. (With `npm install` and a lock
	# listing one platform, each fresh set-up rewrote package-lock.json and left the checkout dirty.)
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(GETH_STAMP): $(PY_STAMP)
	@command -v go >/dev/null || { echo "Go (1.24 or newer) is required to build geth: https://go.dev/dl/"; exit 1; }
	GOBIN=$(abspath $(BIN)) GOFLAGS=-trimpath go install github.com/ethereum/go-ethereum/cmd/geth@$(GETH_VERSION)
	touch $@

run: setup
	$(BIN)/consent-ledger serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python scripts/bench_consent.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
