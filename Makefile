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

.PHONY: venv tools scan-tools mlflow-server demo test test-unit lint images images-test reproduce clean

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

# checkov in its own venv: its pins (boto3 1.35, networkx < 2.7, packaging < 24) conflict with the runtime stack.
$(TOOLS)/checkov: requirements-scan.txt
	test -x .tools/checkov/bin/python || $(PY) -m venv .tools/checkov
	.tools/checkov/bin/pip install -q -r requirements-scan.txt
	mkdir -p $(TOOLS) && ln -sf $(CURDIR)/.tools/checkov/bin/checkov $(TOOLS)/checkov
	touch $@

scan-tools: $(TOOLS)/checkov

# The MLflow tracking server the tests start on loopback, in its own venv: full mlflow pins pyarrow < 26.
$(TOOLS)/mlflow: requirements-mlflow-server.txt
	test -x .tools/mlflow/bin/python || $(PY) -m venv .tools/mlflow
	.tools/mlflow/bin/pip install -q -r requirements-mlflow-server.txt
	mkdir -p $(TOOLS) && ln -sf $(CURDIR)/.tools/mlflow/bin/mlflow $(TOOLS)/mlflow
	touch $@

mlflow-server: $(TOOLS)/mlflow

# ruff; the import contracts in pyproject.toml (layers, no torch in config/storage/pipeline/kube, no cycle); vulture.
lint: venv
	$(BIN)/ruff check mysproj jobs tests images
	$(BIN)/lint-imports
	$(BIN)/vulture

demo: venv
	$(BIN)/mysproj run --config mysproj/pipeline/presets/demo.yaml

test-unit: venv
	$(BIN)/python -m pytest -q -m "not s3 and not kube"

# Everything: the Kubernetes tier as a pytest session of its own beside the other tiers (tests/run_tiers.sh).
test: venv tools scan-tools mlflow-server lint images-test
	PY=$(BIN)/python bash tests/run_tiers.sh

# The CPU and GPU images with docker, buildah or podman (whichever works), on the public bases where the builder can
# pull them, else on a Debian base built here (images/base.sh). Prints the image names.
images:
	bash images/build.sh

# What the container and Kubernetes test tiers run: podman/buildah/runc/debootstrap installed with apt where missing,
# both images built (cached: the debootstrap base in /var/cache/mysproj-images, layers in the container storage).
images-test:
	bash images/install-tools.sh
	IMAGE_TAG=test bash images/build.sh

# One reproduction against the current kube context (KUBECONFIG): a fresh release of the chart with the dataset's
# values, wait, fetch the report, compare Table 1 with the paper; the exit code says whether it matched.
#   make reproduce DATASET=dtd [SEEDS=0,1] [VALUES=file] [SET="key=value ..."] [NAMESPACE=ns] [RELEASE=name]
#                  [OUT=dir] [TIMEOUT=seconds] [INTERVAL=seconds between status polls]
reproduce: venv tools
	@test -n "$(DATASET)" || { echo "make reproduce: set DATASET (e.g. DATASET=dtd)" >&2; exit 64; }
	$(BIN)/mysproj reproduce --dataset "$(DATASET)" $(if $(SEEDS),--seeds "$(SEEDS)") \
		$(if $(VALUES),--values "$(VALUES)") $(foreach s,$(SET),--set "$(s)") \
		$(if $(NAMESPACE),--namespace "$(NAMESPACE)") $(if $(RELEASE),--release "$(RELEASE)") \
		$(if $(OUT),--out "$(OUT)") $(if $(TIMEOUT),--timeout "$(TIMEOUT)") $(if $(INTERVAL),--interval "$(INTERVAL)")

clean:
	rm -rf $(VENV) .tools runs .pytest_cache
