# Heady gateway: one entry point for running, testing, benchmarking and deploying.
# Every target installs what it needs (pinned) on first use.

SHELL := /bin/bash
PORT ?= 8787
# The Worker's Python is 3.12 (Pyodide 0.26.0a2); production's next runtime is 3.13.
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python3.12) $(shell command -v python3.12))
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13.*/bin/python3.13) $(shell command -v python3.13))
# torch's CPU wheel on this machine's disk is for Python 3.11 only (tests/torch).
PY311 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.11.*/bin/python3.11) $(shell command -v python3.11))
VENV := .venv
PY := $(VENV)/bin/python
NODE22_BIN := $(CURDIR)/tools/node22/node_modules/.bin
export WRANGLER_SEND_METRICS := false

.PHONY: help install dev gateway test lint test-py313 deploy-check bench clean browser-install test-browser \
	torch-install test-torch

help:
	@echo "make dev       simulated 8-node cluster + gateway on http://127.0.0.1:$(PORT)"
	@echo "               (fine-tuning on the CPU: installs .venv-torch; TRAIN=0 make dev skips it)"
	@echo "make gateway   gateway only, secrets/vars from .dev.vars (like wrangler dev)"
	@echo "make test      everything CI runs (lint, unit, e2e in workerd, browser, node/CLI, bench smoke, deploy dry-run)"
	@echo "make bench     benchmarks: gateway vs direct, bare JS, bare Python -> bench/results.md"
	@echo "make deploy-check   npx wrangler deploy --dry-run (bundles the real deploy offline)"
	@echo "make test-browser   the status page in headless Chromium (installs Debian's chromium)"
	@echo "make test-torch     tests/torch (image engine, fine-tuning on the CPU) in .venv-torch (Python 3.11)"

install: $(VENV)/.installed node_modules/.installed tools/node22/node_modules/.installed .harness/.sdk

$(VENV)/.installed: pyproject.toml
	@test -n "$(PY312)" || { echo "Python 3.12 not found (pyenv install 3.12.1)"; exit 1; }
	test -x $(PY) || $(PY312) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	# Install scripts are not needed: miniflare and wrangler find workerd through the
	# @cloudflare/workerd-linux-64 package itself.
	npm ci --ignore-scripts --no-audit --no-fund
	touch $@

tools/node22/node_modules/.installed: tools/node22/package.json tools/node22/package-lock.json
	# Node 22 for wrangler 4; its preinstall (approved in allowScripts) unpacks the binary.
	cd tools/node22 && npm ci --no-audit --no-fund
	touch $@

.harness/.sdk: $(VENV)/.installed harness/gateway.py
	$(PY) -c "from harness.gateway import ensure_sdk; ensure_sdk()"
	touch $@

# The fine-tuning trainers beside nodes 7-8 run in the torch venv (docs/fine-tuning.md, "The dev
# cluster"). If it cannot be installed (no Python 3.11) the cluster still starts, without them,
# and says so. TRAIN=0 make dev: no torch venv and no trainers (fine-tuning jobs never start).
TRAIN ?= 1
dev: install
ifneq ($(TRAIN),0)
	@$(MAKE) --no-print-directory torch-install || echo "make dev: the torch venv is not" \
	  "installed (above): no trainers, fine-tuning jobs will not start. TRAIN=0 skips this step."
endif
	PORT=$(PORT) HEADY_DEV_TRAIN=$(TRAIN) $(PY) -m harness.dev

gateway: install
	PORT=$(PORT) $(PY) -m harness.gateway

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The pure modules must run unchanged on production's next Python (3.13).
test-py313: $(VENV)/.installed
	@test -n "$(PY313)" || { echo "Python 3.13 not found (pyenv install 3.13.0)"; exit 1; }
	test -x .venv313/bin/python || $(PY313) -m venv .venv313
	# tests/unit builds uploads with httpx and checks API shapes against the openai SDK's types.
	.venv313/bin/python -m pip install --quiet --disable-pip-version-check pytest==9.2.0 hypothesis==6.170.17 pytest-timeout==2.4.0 httpx==0.28.1 openai==3.57.0
	.venv313/bin/python -m pytest -q -p no:cacheprovider tests/unit

# The torch venv (.venv-torch): Python 3.11, because the CPU-only torch wheel this project pins
# (2.13.0+cpu, ~190 MB) is the one the machines keep for 3.11; plain `pip install torch` pulls
# gigabytes of CUDA wheels. One pin list (requirements-torch.txt) for everything that needs torch:
# tests/torch (image engine, fine-tuning) and `make dev`'s trainers (the fine-tuning runner beside
# nodes 7-8). The marker is named after the pin list's hash, so editing a pin reinstalls and
# nothing else does. First install ~1.5 min with warm pip caches.
TORCH_VENV := .venv-torch
TORCH_PINS_HASH = $(shell sha256sum requirements-torch.txt | cut -c1-16)
TORCH_MARKER = $(TORCH_VENV)/.installed-$(TORCH_PINS_HASH)

torch-install: $(TORCH_MARKER)

$(TORCH_MARKER): requirements-torch.txt
	@test -n "$(PY311)" || { echo "Python 3.11 not found (pyenv install 3.11.7)"; exit 1; }
	test -x $(TORCH_VENV)/bin/python || $(PY311) -m venv $(TORCH_VENV)
	rm -f $(TORCH_VENV)/.installed-*
	$(TORCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-torch.txt
	touch $@

# -o addopts: the main run's addopts ignore tests/torch (it needs this venv); here it is the point.
# `install` too: tests/torch start workerd and the simulated fleet (the main 3.12 venv).
test-torch: install torch-install
	HF_HUB_OFFLINE=1 $(TORCH_VENV)/bin/python -m pytest -q -p no:cacheprovider -o addopts=-ra tests/torch

# Debian's Chromium and its driver for the status page's browser test (no browser download at
# test time). Debian's mirrors keep only the current build of a suite (a security update
# replaces it: 150.0.7871.100 in bookworm, 156.0.8078.108 in bookworm-security on 2026-11-27),
# so an exact pin would break a fresh clone within weeks; chromium-driver depends on exactly
# its own chromium version, so the pair always matches. CHROMIUM_VERSION=<debian version>
# pins both while the mirror still has that build. fonts-dejavu-core: the screenshots' font.
CHROMIUM_VERSION ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM_PKGS := chromium$(if $(CHROMIUM_VERSION),=$(CHROMIUM_VERSION)) \
	chromium-driver$(if $(CHROMIUM_VERSION),=$(CHROMIUM_VERSION)) fonts-dejavu-core
browser-install:
	@if [ -z "$(CHROMIUM_VERSION)" ] && command -v chromium >/dev/null \
	    && command -v chromedriver >/dev/null && fc-list | grep -q DejaVuSans; then \
	  echo "browser: $$(dpkg-query -W -f='chromium $${Version}, chromium-driver ' chromium)$$(dpkg-query -W -f='$${Version}' chromium-driver)"; \
	else \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PKGS); \
	fi

# The status page in headless Chromium against the gateway in the offline runtime.
test-browser: install browser-install
	$(PY) -m pytest -q tests/browser

deploy-check: install
	PATH="$(NODE22_BIN):$$PATH" npx wrangler deploy --dry-run --outdir .harness/deploy-dry-run

test: install browser-install lint
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-py313
	$(MAKE) --no-print-directory deploy-check
	$(MAKE) --no-print-directory test-torch

bench: install
	$(PY) -m bench.run --out bench/results.md

# Load on the gateway while simulated nodes flap; CHAOS_S seconds of chaos. Then a 2,000-line
# batch while batch nodes die with their workers (bench/sections/batch.py).
.PHONY: chaos
CHAOS_S ?= 60
chaos: install
	$(PY) -m bench.run --sections chaos,batch-chaos --chaos-seconds $(CHAOS_S)

clean:
	rm -rf .harness .venv .venv313 .venv-torch node_modules tools/node22/node_modules dist
