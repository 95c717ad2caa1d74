# sprim — set-up and checks. Every target is idempotent and works as root on a fresh Debian
# machine with Python 3.11: system packages are installed only when absent.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dcmtk 3.6.7 and Orthanc leave Nagle on: a 40 ms stall per C-STORE without this.
export TCP_NODELAY := 1
DEMO_OUT ?= demo-output

.PHONY: demo test lint bench fuzz conformance sysdeps services benchdeps venv clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# Debian packages: DICOM peers and validator, the archive, the broker, the browser of the
# report/console tests, Mesa's EGL for VTK's off-screen mesh previews.
SYS_TOOLS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc rabbitmq-server:rabbitmq-server \
	chromium:chromium chromedriver:chromium-driver
sysdeps:
	@missing=""; for pair in $(SYS_TOOLS); do bin=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing="$$missing $$pkg"; done; \
	  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	  ldconfig -p | grep -q libEGL_mesa || missing="$$missing libegl1 libegl-mesa0"; \
	  if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	@# docker-compose (v1, Debian) checks docker/compose.yaml in the tests: no engine needed
	@command -v docker-compose >/dev/null 2>&1 || { echo "installing: docker-compose"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }

# RabbitMQ on 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432 (started if not running).
services: sysdeps
	@if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then echo "starting rabbitmq"; \
	  rabbitmq-server -detached; for i in $$(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done; fi
	@if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && command -v pg_ctlcluster >/dev/null; then \
	  echo "starting postgresql"; pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -1) main start || true; fi

# Peers the benchmarks compare against.
benchdeps:
	@missing=""; for pair in plastimatch:plastimatch dcm2niix:dcm2niix; do bin=$${pair%%:*}; \
	  command -v $$bin >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	  if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

demo: venv
	$(BIN)/sprim run demo/ct-abdomen --out $(DEMO_OUT)
	@echo "report: $(abspath $(DEMO_OUT))/report.html"

lint: venv
	$(BIN)/ruff check pipelines workers tasks tests bench
	$(BIN)/ruff format --check pipelines workers tasks tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy pipelines workers tasks

test: venv services lint
	$(BIN)/pytest -q -rs

# The whole mutation corpus through `sprim run` (docs/dicom.md, "Mutation corpus"): prints and
# writes the outcome table (.sprim/fuzz/table.md, results.json); exits 1 on any wrong outcome.
fuzz: venv
	$(BIN)/python -m tests.mutations --out .sprim/fuzz

# Every shared series through the default rules and forced through its modality's steps, and
# the quirk copies, dciodvfy on each output (docs/dicom.md, "Real-world conformance"); then the
# table of that section regenerated.
conformance: venv sysdeps
	$(BIN)/pytest -q -rs tests/workers/test_conformance.py
	$(BIN)/python -m tests.workers.test_conformance

bench: venv services benchdeps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(DEMO_OUT) .sprim .pytest_cache
