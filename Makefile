# Everything a fresh Debian 12 machine needs is installed by these targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo loadtest bench scale lint setup broker prometheus clean

# `make loadtest SCENARIO=5k OUT=dir`: any scenario of loadtest/scenarios (or a path)
SCENARIO ?= 1k
OUT ?= loadtest-$(SCENARIO)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

broker:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto)
	@command -v systemd-analyze >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd)

# Prometheus: the metrics test scrapes a running otad with a real server (its own config, port
# and storage; the package's own service is not used).
prometheus:
	@test -x /usr/bin/prometheus || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

setup: broker prometheus $(STAMP)

test: setup
	$(BIN)/ruff check protocol otad mqttio loadtest tests
	$(BIN)/ruff format --check protocol otad mqttio loadtest tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check protocol otad mqttio loadtest tests
	$(BIN)/ruff format --check protocol otad mqttio loadtest tests
	$(BIN)/mypy

demo: setup
	$(BIN)/python -m loadtest demo

loadtest: setup
	$(BIN)/python -m loadtest run $(SCENARIO) --out $(OUT)

bench: setup
	$(BIN)/python -m loadtest bench

scale: setup
	$(BIN)/python -m loadtest scale

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
