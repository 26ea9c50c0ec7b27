# hms-tasks: `make run` starts the whole embedded stack, `make test` runs every check.
# Both create .venv on first use; nothing else needs to be installed by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The suite runs once more against PostgreSQL when one answers here (CI's machine has one).
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/hms_tasks
BENCH ?=

.PHONY: run test lint pytest faults test-postgres bench sentinel venv redis-server-binary clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing python3-venv"; \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Options of `hms-tasks run` go in ARGS: make run ARGS="--api-port 8010 --patients 5000".
# Ctrl-C exits 0: the supervisor takes the terminal's foreground group, so make never sees the
# SIGINT (make re-raises one it gets: exit 130).
ARGS ?=
run: venv
	$(BIN)/hms-tasks run $(ARGS)

# Tests start their own redis-server on a free port; they need the binary, not a service.
# promtool (Debian's prometheus package) checks both Prometheus exporters' output; chromium and
# chromium-driver run the status page's browser test (tests/test_assets_browser.py).
redis-server-binary:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server (Debian package)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; \
	  else \
	    echo "redis-server is needed: sudo apt-get install redis-server (or brew install redis)"; \
	    exit 1; \
	  fi; }
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing promtool (Debian package prometheus, server not started)"; \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus || \
	      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }; } \
	      </dev/null >/dev/null && { systemctl disable --now prometheus 2>/dev/null || true; }; \
	  else \
	    echo "promtool not found: its test is skipped (sudo apt-get install prometheus)"; \
	  fi; }
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (Debian packages: the status page's browser test)"; \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver || \
	      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }; } \
	      </dev/null >/dev/null; \
	  else \
	    echo "chromium and chromedriver are needed: sudo apt-get install chromium chromium-driver"; \
	  fi; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy hms_tasks

pytest: venv redis-server-binary
	$(BIN)/pytest

# The fault suite alone (tests/faults/: real workers, Redis kills, malformed messages).
faults: venv redis-server-binary
	$(BIN)/pytest -m faults

test-postgres: venv redis-server-binary
	@if $(BIN)/python -c "import psycopg; psycopg.connect('postgresql://postgres@127.0.0.1:5432/postgres', connect_timeout=3).close()" 2>/dev/null; then \
	  echo "PostgreSQL answers on 127.0.0.1:5432: running the suite against it"; \
	  DATABASE_URL=$(PG_TEST_URL) $(BIN)/pytest -m "not faults"; \
	else \
	  echo "no PostgreSQL on 127.0.0.1:5432: suite ran on SQLite only"; \
	fi

test: lint pytest
	@[ -n "$$DATABASE_URL" ] || $(MAKE) --no-print-directory test-postgres

bench: venv redis-server-binary
	$(BIN)/python -m bench $(BENCH)

# Redis behind Sentinel on loopback, in the foreground (Ctrl-C stops it): a master on 6390,
# replicas on 6391 and 6392, sentinels on 26390-26392 (master name mymaster). It prints the
# REDIS_SENTINELS=... REDIS_SENTINEL_MASTER=... to run hms-tasks against it.
sentinel: venv redis-server-binary
	$(BIN)/python -m bench.sentinel_stack

clean:
	rm -rf .hms-tasks build dist *.egg-info .mypy_cache .ruff_cache
