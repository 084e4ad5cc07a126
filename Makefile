# mysproj: `make demo` runs the whole pipeline locally; `make test` runs every test tier (unit, S3, Kubernetes).
# Each target installs what it needs on a fresh machine (Debian 12, Python 3.11, PyPI/apt/npm reachable).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := $(CURDIR)/.tools/bin
export PATH := $(TOOLS):$(CURDIR)/$(BIN):$(PATH)
# Built control-plane binaries are cached outside the work tree so clean clones reuse them.
K8S_CACHE ?= /var/cache/mysproj-k8s
export K8S_CACHE

.PHONY: venv tools demo test test-unit lint images clean

$(BIN)/.stamp: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# DeepSpeed's setup imports torch: install it after torch, without build isolation (which would fetch another torch).
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q --no-deps -e .
	touch $@

venv: $(BIN)/.stamp

tools: venv
	bash k8s/tools/install.sh

lint: venv
	$(BIN)/ruff check mysproj jobs tests

demo: venv
	$(BIN)/mysproj run --config mysproj/pipeline/presets/demo.yaml

test-unit: venv
	$(BIN)/python -m pytest -q -m "not s3 and not kube"

test: venv tools lint
	$(BIN)/python -m pytest -q -rs

images:
	bash images/build.sh

clean:
	rm -rf $(VENV) .tools runs .pytest_cache
