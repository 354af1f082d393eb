# NeuroWeaver developer workflow. Everything runs from the repo-root virtualenv (.venv).
SHELL := /bin/bash
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
PACKAGES := $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
# mypy in `make lint` checks every lib and service (settings in pyproject.toml).
MYPY_SRC := $(wildcard libs/*/src services/*/src)
# llama.cpp's converter scripts (convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py) for exports: not in the
# llama-cpp-python wheel, so extracted from its sdist on PyPI, pinned to requirements.txt's version (neuroweaver_ml.export;
# tests/packaging/test_llama_cpp_pins.py keeps the copies of that version equal).
LLAMA_CPP_TOOLS := .venv/share/neuroweaver/llama.cpp-$(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)/.complete.json

.PHONY: install proto proto-check lint format test test-fast up demo clean

install: .venv/.installed $(LLAMA_CPP_TOOLS) node_modules/.installed clients/typescript/node_modules/.installed examples/relaycore/node_modules/.installed ## .venv with everything (torch pinned to the CPU build) and the Node tools

.venv/.installed: requirements.txt requirements-nodeps.txt constraints.txt $(PACKAGES)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt -c constraints.txt
	$(PIP) install -q --no-deps $(foreach p,$(PACKAGES),-e $(dir $(p)))
	touch $@

$(LLAMA_CPP_TOOLS): | .venv/.installed
	$(PY) -m neuroweaver_ml.export fetch-tools

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

clients/typescript/node_modules/.installed: clients/typescript/package.json clients/typescript/package-lock.json node_modules/.installed
	cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed

examples/relaycore/node_modules/.installed: examples/relaycore/package.json examples/relaycore/package-lock.json
	cd examples/relaycore && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed

proto: ## regenerate Python code from protos/
	./scripts/gen_protos.sh

proto-check: ## fail when the committed generated code (Python and TypeScript) differs from a fresh generation
	./scripts/gen_protos.sh >/dev/null 2>&1
	git diff --exit-code --stat -- libs/neuroweaver-proto protos/google || { echo "generated code or vendored google/api protos are stale: run make proto"; exit 1; }
	clients/typescript/scripts/check-generated.sh

lint: install ## ruff (lint + format check), buf format check, buf lint, buf breaking against main, mypy on every lib and service
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	npx buf format -d --exit-code || { echo "protos are not buf-formatted: run npx buf format -w"; exit 1; }
	npx buf lint
	npx buf breaking --against '.git#branch=main' || { echo "breaking contract change: see protos/CHANGES.md"; exit 1; }
	.venv/bin/mypy $(MYPY_SRC)

format: install ## format the Python code (CI checks it with ruff format --check)
	.venv/bin/ruff format .

test: lint proto-check ## lint, then the whole test suite (unit, API, SQLite + PostgreSQL, end-to-end)
	$(PY) -m pytest $(wildcard libs services tests) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest libs services -m "not slow and not smollm2" $(PYTEST_ARGS)

up: install ## run every implemented service on the embedded default (SQLite, local executors)
	$(PY) -m neuroweaver_sdk.up

demo: install ## the whole loop with SmolLM2-135M-Instruct and the automotive kit
	$(PY) -m neuroweaver_sdk.demo

clean:
	rm -rf .venv node_modules .pytest_cache
