# recserve: every target runs set-up first, so `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.recserve-setup
PORT_HTTP    ?= 8000
PORT_GRPC    ?= 8001
PORT_METRICS ?= 8002
BACKUP_POLICY ?= deploy/backup-policy.yaml

.PHONY: help setup models build-engines serve demo test test-fast lint proto clean-runtime docs

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP) monitoring-debs browser-debs  ## create .venv with pinned dependencies, install Debian packages (haproxy, libb64-0d, prometheus, prometheus-alertmanager, chromium)

.PHONY: monitoring-debs
monitoring-debs:  # checked on every setup (not only when pyproject.toml changes): promtool/amtool tests need them
	@command -v promtool >/dev/null && command -v amtool >/dev/null || { \
	  echo "setup: installing Debian packages prometheus prometheus-alertmanager (no recommends: no system daemons)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager >/dev/null; }

.PHONY: browser-debs
browser-debs:  # checked on every setup: tests/test_report_html.py opens report.html in headless Chromium (skips without it)
	@command -v chromium >/dev/null || { \
	  echo "setup: installing Debian package chromium (headless, for the HTML report tests; no recommends)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null; } || echo "setup: chromium could not be installed: the HTML report tests will skip"; }

$(STAMP): pyproject.toml
	@command -v haproxy >/dev/null && dpkg -s libb64-0d >/dev/null 2>&1 || { \
	  echo "setup: installing Debian packages haproxy libb64-0d"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy libb64-0d iproute2 >/dev/null; }
	@command -v curl >/dev/null || { echo "setup: installing Debian package curl (control API tests send raw HTTP/2)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
	@test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,s3,deploy]'
	@$(MAKE) --no-print-directory proto
	@touch $(STAMP)

proto: ## generate gRPC code for the control plane API
	@if ls control/api/proto/*.proto >/dev/null 2>&1; then \
	  $(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. control/api/proto/*.proto && \
	  sed -i 's/^from control\.api\.proto import/from recserve.control.api.proto import/' control/api/proto/*_pb2_grpc.py; fi

models: setup  ## build model versions only if none exist yet
	@if ls model_repository/retrieval/[0-9]*/model.onnx >/dev/null 2>&1 && \
	    ls model_repository/ranker/[0-9]*/model.onnx >/dev/null 2>&1 && \
	    ls model_repository/search_model/[0-9]*/model.onnx >/dev/null 2>&1; then \
	  echo "models: built versions present (make build-engines adds a new one)"; \
	else $(PY) -m recserve.build.pipeline; fi
	@test -f artifacts/golden/recommend.json || $(PY) -m recserve.build.spec_golden  # specs/demo.yaml's golden files

build-engines: setup  ## train, export ONNX (+TensorRT on GPU hosts), write NEW model versions with manifests
	$(PY) -m recserve.build.pipeline

serve: models  ## one embedded Triton with the whole repository (PORT_HTTP/PORT_GRPC/PORT_METRICS), Ctrl-C stops
	$(PY) -m recserve.control.serve --http-port $(PORT_HTTP) --grpc-port $(PORT_GRPC) --metrics-port $(PORT_METRICS)

demo: models  ## the whole story on one machine
	$(PY) -m recserve.control.demo

test: models  ## the test suite (real tritonserver, no GPU needed)
	$(PY) -m pytest -q -rs

docs: setup  ## regenerate docs/cli.md (recctl's command reference) from recctl's argparse parser
	$(PY) -m recserve.control.api.clidoc

lint:  setup ## ruff
	$(VENV)/bin/ruff check .

clean-runtime:  ## remove runtime state (.recserve/)
	rm -rf .recserve

# ---- drills (drills/): disaster-recovery drills against a real fleet; reports in reports/drills/latest
.PHONY: drills drill-smoke drill drill-controls
# SPEC=<serving spec>: the drills guard a user's repository (recctl init writes the spec); the demo's models are
# then not needed (not built). ROLL_MODEL=<model>: the model the rollover drills roll (default: from the spec).
DRILL_SPEC = $(if $(SPEC),--spec $(SPEC))$(if $(ROLL_MODEL), --roll-model $(ROLL_MODEL))
DRILL_DEPS = $(if $(SPEC),setup,models)

drills: $(DRILL_DEPS)  ## run every drill spec (drills/specs/*.yaml); summary table + reports/drills/latest (SPEC=: a user's repository)
	$(PY) -m recserve.drills run $(DRILL_SPEC)

drill-smoke: $(DRILL_DEPS)  ## crash, hang, overload, rollover-under-load, bad-rollover (CI); prints the summary table (SPEC=: a user's repository)
	$(PY) -m recserve.drills smoke $(DRILL_SPEC)

drill-controls: models  ## negative controls: crash, bad-rollover, overload, hang against fleets broken on purpose; exit 0 only when each fails for its named reason
	$(PY) -m recserve.drills controls

drill: $(DRILL_DEPS)  ## one drill: make drill NAME=crash (list: python -m recserve.drills list; SPEC=: a user's repository)
	@test -n "$(NAME)" || { echo "usage: make drill NAME=<drill>   (names: $(PY) -m recserve.drills list)"; exit 2; }
	$(PY) -m recserve.drills run $(NAME) $(DRILL_SPEC)

# ---- perf (perf/): perf_analyzer suites, ratios, capacity, tuning, regression check ----
.PHONY: perf perf-smoke perf-tune perf-check
PERF_SUITE ?= full
MODEL      ?= ranker
# SPEC=spec.yaml: measure a serving spec's models (recctl init writes one) with perf/suites/spec-<suite>.yaml;
# the demo's models are then neither built nor needed.
SPEC       ?=
PERF_DEPS  := $(if $(SPEC),setup,models)
PERF_SPEC  := $(if $(SPEC), --spec $(SPEC),)

perf: $(PERF_DEPS)  ## full perf suite (perf/suites/$(PERF_SUITE).yaml) -> reports/perf/<timestamp>/ + reports/perf/latest; SPEC=spec.yaml for a user's repository
	$(PY) -m recserve.perf run $(PERF_SUITE)$(PERF_SPEC)

perf-smoke: $(PERF_DEPS)  ## short perf suite, under 3 minutes on 2 cores (CI); SPEC=spec.yaml for a user's repository
	$(PY) -m recserve.perf run smoke$(PERF_SPEC)

perf-tune: models  ## search instances/queue delay/preferred batch for MODEL=ranker; proposes a config, never edits it
	$(PY) -m recserve.perf tune $(MODEL)

perf-check: $(PERF_DEPS)  ## judge reports/perf/latest ratios against their CPU ceilings (perf/baseline.json); CI
	$(PY) -m recserve.perf check

.PHONY: fleet-up fleet-down
fleet-up: models  ## control plane + active-active Triton pool + HAProxy + degraded-answer server in the background (gRPC :8001, HTTP :8000); idempotent; MONITOR=1 also runs monitor-up
	$(PY) -m recserve.control.recctl up --grpc-port $(PORT_GRPC) --http-port $(PORT_HTTP) --backup-policy $(BACKUP_POLICY)
	@if [ "$(MONITOR)" = 1 ]; then $(MAKE) --no-print-directory monitor-up; fi

fleet-down: setup  ## stop what fleet-up started (control plane, instances, HAProxy) and nothing else
	$(PY) -m recserve.control.recctl down

# ---- TensorRT (GPU hosts; untested on a GPU until a user's run passes) ----
.PHONY: gpu-check
gpu-check: setup  ## TensorRT path on one GPU (needs pip install -e '.[gpu]'): engines, parity, serving, perf -> reports/gpu-check/
	tools/gpu-check

# ---- monitoring (deploy/monitoring): Prometheus + Alertmanager + webhook receiver on loopback, files in .recserve/monitoring
.PHONY: monitor-up monitor-down
monitor-up: setup  ## Prometheus :9090, Alertmanager :9093, alert receiver :9095 scraping the fleet (make fleet-up MONITOR=1 does both)
	$(PY) -m recserve.control.monitoring.stack up

monitor-down: setup  ## stop what monitor-up started
	$(PY) -m recserve.control.monitoring.stack down
