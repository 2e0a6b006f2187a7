# Switchboard: the two commands a newcomer needs are `make run` and `make test`.
# Every target creates the virtual environment first if it is missing or stale.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PACKAGES := libs/common libs/replica services/gateway services/router services/scheduler services/generator tools
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test compose-test venv buf promtool protos protos-check deploy-files experts gate lint clean

# TRACES=1 also runs the local trace viewer (Phoenix, installed into ~/.cache/switchboard/phoenix on first use).
TRACES ?=

run: venv experts gate  ## Start the whole stack locally (gateway on 127.0.0.1:50051; TRACES=1 adds the trace viewer).
	$(BIN)/switchboard up$(if $(filter 1 yes true,$(TRACES)), --traces)

test: venv buf promtool experts gate  ## Lint, then run every test (unit, cross-service, deployment checks).
	$(BIN)/ruff check .
	$(PY) -m pytest --ignore=tests/compose $(PYTEST_ARGS)

# The compose check needs a container engine: podman (installed here from Debian's packages,
# as root) unless SWITCHBOARD_CONTAINER_ENGINE=docker names a running Docker daemon.
CONTAINER_PACKAGES := podman runc debootstrap

compose-test: venv experts  ## Build every image and run the compose stack for real (tests/compose/README.md).
	@if [ "$${SWITCHBOARD_CONTAINER_ENGINE:-podman}" = podman ]; then \
	  for tool in $(CONTAINER_PACKAGES); do command -v $$tool >/dev/null || missing=1; done; \
	  if [ -n "$$missing" ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q $(CONTAINER_PACKAGES) >/dev/null || \
	      (apt-get update -qq && apt-get install -y -q $(CONTAINER_PACKAGES) >/dev/null); \
	  fi; \
	fi
	$(PY) -m pytest tests/compose $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): requirements/*.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(PY) -m pip install -q -c requirements/constraints.txt -r requirements/dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps $(foreach p,$(PACKAGES),-e $(p))
	touch $(STAMP)

BUF_VERSION := 1.75.0
BUF := .cache/node/node_modules/.bin/buf

buf: $(BUF)  ## Install buf (protobuf lint/format/breaking) from npm into .cache/node.

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .cache/node @bufbuild/buf@$(BUF_VERSION)

PROMTOOL := .cache/tools/prometheus/usr/bin/promtool

promtool: $(PROMTOOL)  ## Unpack promtool from Debian's prometheus package (alert-rule checks).

# apt-get download needs package lists; a fresh machine may have none yet.
$(PROMTOOL):
	mkdir -p .cache/tools/prometheus
	cd .cache/tools/prometheus && (apt-get download prometheus 2>/dev/null || (apt-get update -qq && apt-get download prometheus))
	dpkg -x $$(ls .cache/tools/prometheus/prometheus_*.deb | tail -1) .cache/tools/prometheus
	rm -f .cache/tools/prometheus/prometheus_*.deb

protos: venv  ## Regenerate the Python code of protos/ into libs/common.
	$(PY) scripts/gen_protos.py

protos-check: venv  ## Fail if the checked-in generated code is stale.
	$(PY) scripts/gen_protos.py --check

deploy-files: venv  ## Render the deployment files that repeat config/experts.yaml (scripts/render_deploy.py).
	$(PY) scripts/render_deploy.py render

experts: venv  ## Build the demo experts into the cache (no-op when cached).
	$(BIN)/switchboard experts build

gate: experts  ## Score the experts on held-out prompts and train the router's default gate (no-op when cached).
	$(BIN)/switchboard router build

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
