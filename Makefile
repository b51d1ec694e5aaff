# PhoneShop: two commands.
#   make run    install what running needs, then run the whole stack in the foreground
#   make test   install what the tests need too, then run the test suite
# `make help` lists every target. Each one installs only what it needs and only
# what is missing, so a second run does nothing more.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The interpreter the .venv is made from: 3.11 or newer (`make run PYTHON=python3.12`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# ---- system packages (Debian/Ubuntu), each target only what it uses -----------
# Binaries, each from the Debian package of the same name.
RUN_BINARIES := redis-server nginx
# chromium: the headless browser of the /live page test (tests/test_live.py).
TEST_BINARIES := chromium
# wrk: the HTTP ceilings of make bench.
LOAD_BINARIES := wrk
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
export PATH := $(PATH):/usr/sbin:/sbin

# $(call apt-packages,PACKAGE...[,optional]): apt-get install the ones whose
# binary is missing. With "optional", a package apt cannot install (Ubuntu has
# no chromium deb, only a snap) is a warning, not a failure.
define apt-packages
	@missing=""; \
	for package in $(1); do \
	  command -v "$$package" >/dev/null 2>&1 || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
	  fail() { \
	    if [ "$(2)" = optional ]; then echo "WARNING: could not install$$missing; the tests that need it are skipped (README: Troubleshooting)" >&2; \
	    else echo "Could not install$$missing: install it by hand (README: Troubleshooting), then run make again." >&2; exit 1; fi; }; \
	  if ! command -v apt-get >/dev/null; then fail; \
	  else \
	    echo "Installing with apt-get:$$missing"; \
	    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then $(SUDO) apt-get update || true; fi; \
	    $(APT_INSTALL) $$missing || { $(SUDO) apt-get update && $(APT_INSTALL) $$missing; } || fail; \
	  fi; \
	fi
endef

.PHONY: help setup venv run-packages test-packages load-packages run test lint status lock

help:
	@echo "make run       install what running needs, then start redis (REDIS_CLUSTER=1: a local cluster), the app instances, nginx,"
	@echo "               the mail worker and a dev SMTP sink in the foreground (Ctrl-C stops all)"
	@echo "make test      install the test tools too, then run the test suite (PYTEST_ARGS='-k name')"
	@echo "make soak-tests  the long fault tests that make test leaves out (pytest marker soak)"
	@echo "make lint      ruff check and ruff format --check"
	@echo "make status    the health of every process of a running make run stack (exit 1 if one is down)"
	@echo "make loadtest  a bounded headless Locust run against a fresh stack, then the verifier"
	@echo "make bench     the measurements, published to docs/BENCH.md and docs/bench.png (about 11 minutes)"
	@echo "make soak      SOAK_SECONDS (300) of mixed traffic with faults, then the books (loadtests/reports/SOAK.md)"
	@echo "make secrets   the secret files docker compose needs (secrets/, random, kept once made)"
	@echo "make redis-cluster   a local Redis Cluster (3 primaries + 3 replicas) in the foreground"
	@echo "make cluster-status  every node of that cluster with its role"
	@echo "make lock      recompile app/ops/requirements/*.txt from pyproject.toml (needs the package index)"
	@echo "make setup     only install what make run needs (apt packages, .venv)"
	@echo "make test-setup, make load-setup   only install what make test, or the load targets, need"
	@echo "make venv      only make .venv (again, when a previous one is half-made)"
	@echo "make run-packages, make test-packages, make load-packages   only the apt packages of each"
	@echo "make help      this list"
	@echo "Variables: PYTHON=python3.12 picks the interpreter for .venv (3.11+); ports: README.md."

# ---- the .venv and the locked Python packages ---------------------------------
# venv: a working .venv with pip, whatever state a previous run left.
#  - PYTHON must be 3.11+;
#  - Debian's python3 makes venvs only with python3.X-venv (its ensurepip);
#    without it `python3 -m venv` fails halfway and leaves a .venv without pip,
#    so that package is installed first;
#  - a .venv whose python or pip does not run (that half-made one, or one
#    whose interpreter was removed) is deleted and made again.
venv:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  found="$$($(PYTHON) -V 2>/dev/null || true)"; \
	  echo "PhoneShop needs Python 3.11 or newer; PYTHON=$(PYTHON) is $${found:-not found}." >&2; \
	  echo "Install one (Debian 12 and Ubuntu 24.04 ship 3.11+) and point make at it: make run PYTHON=python3.12" >&2; \
	  exit 1; }
	@if [ -e $(VENV) ] && ! $(PY) -m pip --version >/dev/null 2>&1; then \
	  echo "$(VENV) is incomplete (no working python or pip: a python -m venv that failed halfway?): making it again"; \
	  rm -rf $(VENV); \
	fi
	@if [ ! -e $(VENV) ] && ! $(PYTHON) -c 'import ensurepip' 2>/dev/null; then \
	  package="python$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"; \
	  if command -v apt-get >/dev/null; then \
	    echo "$(PYTHON) cannot make a venv without $$package: installing it with apt-get"; \
	    $(APT_INSTALL) $$package || { $(SUDO) apt-get update && $(APT_INSTALL) $$package; }; \
	  else \
	    echo "$(PYTHON) has no ensurepip, so it cannot make a venv: install its venv module ($$package)" >&2; exit 1; \
	  fi; \
	fi
	@if [ ! -e $(VENV) ]; then \
	  $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "$(PYTHON) -m venv $(VENV) failed (above); nothing left behind" >&2; exit 1; }; \
	fi

# $(VENV)/.synced-NAME: app/ops/requirements/NAME.txt installed exactly (hashes checked)
# with the project itself (editable, no dependencies of its own). Redone when
# the lock changes; `python3 -m app.ops.lock check` first fails on a stale lock.
$(VENV)/.synced-%: app/ops/requirements/%.txt app/ops/requirements/all.txt pyproject.toml | venv
	@$(PYTHON) -m app.ops.lock check
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $<
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

run-packages:
	$(call apt-packages,$(RUN_BINARIES))
test-packages: run-packages
	$(call apt-packages,$(TEST_BINARIES),optional)
load-packages: run-packages
	$(call apt-packages,$(LOAD_BINARIES))

# What each target needs; every one also checks that the locks are fresh.
setup: run-packages venv $(VENV)/.synced-run
	@$(PYTHON) -m app.ops.lock check
test-setup: test-packages venv $(VENV)/.synced-test
	@$(PYTHON) -m app.ops.lock check
load-setup: load-packages venv $(VENV)/.synced-load
	@$(PYTHON) -m app.ops.lock check
.PHONY: test-setup load-setup

# make test leaves out the long fault tests (marker soak); make soak-tests runs only them.
test: test-setup
	$(VENV)/bin/pytest -m "not soak" $(PYTEST_ARGS)

soak-tests: test-setup
	$(VENV)/bin/pytest -m soak $(PYTEST_ARGS)
.PHONY: soak-tests

lint: test-setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# make lock: pip-compile every app/ops/requirements/*.txt afresh from pyproject.toml's
# ranges (app/ops/lock.py says which groups each holds). Commit the result.
lock: venv
	$(PY) -m pip install --quiet pip-tools
	$(PY) -m app.ops.lock compile

# make secrets: the compose stack's secret files (docker-compose.yml), random
# and URL-safe, each written only when missing. The folder is private to you;
# the files are readable by the containers' unprivileged users.
COMPOSE_SECRETS := secrets/redis_password secrets/admin_token
.PHONY: secrets
secrets: $(COMPOSE_SECRETS)
$(COMPOSE_SECRETS):
	@mkdir -p secrets && chmod 700 secrets
	@$(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $@.tmp && chmod 644 $@.tmp && mv $@.tmp $@
	@echo "Wrote $@"

# make run:
#  1. writes a random ADMIN_TOKEN into .env when neither the environment nor
#     .env has one, and prints it (only then);
#  2. loads .env (as honcho does: .env wins over the environment), derives
#     REDIS_URL from REDIS_PORT when unset, stops if a port the stack needs
#     is taken (app/ops/ports.py says which, by whom and the variable that moves
#     it), prints every URL and where logs and data go;
#     With REDIS_CLUSTER=1 it runs a local Redis Cluster (the Procfile's cluster
#     line, 3 primaries + 3 replicas on REDIS_CLUSTER_BASE_PORT..+5) instead of one
#     redis-server and sets REDIS_CLUSTER_NODES to it; with REDIS_CLUSTER_NODES set
#     (and REDIS_CLUSTER unset) it starts no Redis and uses that cluster;
#  3. execs honcho on the Procfile, with MAIL_WORKERS (default 2) mail worker
#     processes sharing the mailer group (each its own {host}-{pid} name and the
#     next free metrics port from MAIL_METRICS_PORT). Ctrl-C or SIGTERM (make forwards it)
#     makes honcho SIGTERM every process group, then SIGKILL whatever is left
#     after 5 s: nothing survives it.
run: setup
	@mkdir -p var/redis var/nginx var/log var/mail
	@if [ -z "$${ADMIN_TOKEN:-}" ] && ! grep -Eqs '^[[:space:]]*(export[[:space:]]+)?ADMIN_TOKEN=[^[:space:]]' .env; then \
	  token="$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(32))')"; \
	  (umask 077 && printf 'ADMIN_TOKEN=%s\n' "$$token" >> .env); \
	  echo "Generated an admin token and saved it in .env:"; \
	  echo "  ADMIN_TOKEN=$$token"; \
	fi
	@set -a; if [ -f .env ]; then . ./.env; fi; set +a; \
	export REDIS_PORT="$${REDIS_PORT:-6390}"; \
	export REDIS_URL="$${REDIS_URL:-redis://127.0.0.1:$$REDIS_PORT/0}"; \
	if [ "$${REDIS_CLUSTER:-0}" = 1 ]; then \
	  cbase="$${REDIS_CLUSTER_BASE_PORT:-7001}"; \
	  [[ "$$cbase" =~ ^[0-9]+$$ ]] || { echo "REDIS_CLUSTER_BASE_PORT must be a port, got '$$cbase'" >&2; exit 2; }; \
	  export REDIS_CLUSTER_NODES="$$(for ((i = 0; i < 6; i++)); do printf '127.0.0.1:%d,' $$((cbase + i)); done | sed 's/,$$//')"; \
	  redis_proc=cluster; redis_line="local cluster $$REDIS_CLUSTER_NODES (3 primaries + 3 replicas)"; \
	elif [ -n "$${REDIS_CLUSTER_NODES:-}" ]; then \
	  redis_proc=""; redis_line="the cluster REDIS_CLUSTER_NODES=$$REDIS_CLUSTER_NODES (not started here)"; \
	else \
	  redis_proc=redis; redis_line="$$REDIS_URL"; \
	fi; \
	export BEHIND_PROXY="$${BEHIND_PROXY:-1}"; \
	export WEB_ACCESS_LOG="$${WEB_ACCESS_LOG:-var/log/web-access.log}"; \
	export MAIL_METRICS_PORT="$${MAIL_METRICS_PORT:-9101}"; \
	$(PY) -m app.ops.ports; \
	http="$${HTTP_PORT:-8080}"; phones="$${SEED_PHONES_PORT:-5555}"; orders="$${SEED_ORDERS_PORT:-7777}"; \
	base="$${APP_BASE_PORT:-8001}"; count="$${WEB_INSTANCES:-2}"; instances=""; \
	for ((i = 0; i < count; i++)); do instances="$$instances http://127.0.0.1:$$((base + i))/"; done; \
	scrape=""; for ((i = 0; i < count; i++)); do scrape="$$scrape http://127.0.0.1:$$((base + i))/metrics"; done; \
	url() { if [ "$$1" = 0 ]; then echo "off"; else echo "http://127.0.0.1:$$1$$2"; fi; }; \
	echo; \
	echo "PhoneShop is starting. Ctrl-C stops everything."; \
	echo "  API (nginx)     $$(url "$$http" /)   OpenAPI: $$(url "$$http" /openapi.json)"; \
	echo "  API docs        $$(url "$$http" /docs)   live orders: $$(url "$$http" /live)"; \
	echo "  seed phones     $$(url "$$phones" /phones)"; \
	echo "  seed orders     $$(url "$$orders" /orders)"; \
	echo "  app instances  $$instances  (direct, bypassing nginx)"; \
	echo "  redis           $$redis_line"; \
	echo "  metrics         $$(url "$$http" /metrics) from this box (elsewhere: the admin token)"; \
	echo "                  per instance:$$scrape; mail worker: $$(url "$$MAIL_METRICS_PORT" /metrics)"; \
	if [ -z "$${SMTP_HOST:-}" ]; then \
	  export SMTP_HOST=127.0.0.1 SMTP_PORT="$${SMTP_PORT:-1025}"; procs="$$redis_proc web nginx mail smtp"; \
	  echo "  mail            dev SMTP sink 127.0.0.1:$$SMTP_PORT, every mail saved in $${MAIL_SINK_DIR:-var/mail}/"; \
	else \
	  procs="$$redis_proc web nginx mail"; \
	  echo "  mail            worker sending through $$SMTP_HOST:$${SMTP_PORT:-1025} (no dev sink)"; \
	fi; \
	echo "  admin token     ADMIN_TOKEN in .env (or your environment)"; \
	echo "  logs            every process below, prefixed by its name;"; \
	echo "                  nginx JSON access log var/log/nginx-access.log,"; \
	echo "                  app access log $$WEB_ACCESS_LOG; all JSON lines carrying request_id"; \
	mail_workers="$${MAIL_WORKERS:-2}"; \
	[[ "$$mail_workers" =~ ^[1-9][0-9]?$$ ]] || { echo "MAIL_WORKERS must be 1 to 99, got '$$mail_workers'" >&2; exit 2; }; \
	echo "  mail workers    $$mail_workers (MAIL_WORKERS), each MAIL_CONCURRENCY SMTP sessions"; \
	echo "  health          make status (in another terminal)"; \
	echo "  data            redis AOF in var/redis/ (a local cluster: $${REDIS_CLUSTER_DIR:-var/redis-cluster}/); rendered nginx config var/nginx/nginx.conf"; \
	echo; \
	exec $(VENV)/bin/honcho start -f Procfile -c "mail=$$mail_workers" $$procs

# make status: app/ops/status.py reads .env and make run's defaults as above, checks
# redis, every instance, nginx, the mail worker, its backlog and dead letters,
# the SMTP server, and exits 1 when one of them is down.
status: setup
	@$(PY) -m app.ops.status

# make loadtest: a bounded headless Locust run against a fresh stack, then the
# verifier (loadtests/__main__.py). make bench: the measurements, written to
# loadtests/reports/ and published to docs/BENCH.md + docs/bench.png, which the
# repository keeps (loadtests/bench.py). Both pin the stack and the load
# generator to disjoint CPUs: STACK_CPUS=0 LOAD_CPUS=1 by default on 2 cores
# (loadtests/rig.py). loadtest under 10 minutes, bench about 11.
.PHONY: loadtest bench
loadtest: load-setup
	$(PY) -m loadtests

bench: load-setup
	$(PY) -m loadtests.bench --publish docs

# make soak: SOAK_SECONDS (default 300) of mixed traffic with faults on a seeded
# schedule against a fresh stack, then the books (loadtests/soak.py). Replay a
# run with SOAK_SEED=<the seed it printed>.
.PHONY: soak
soak: load-setup
	$(PY) -m loadtests.soak

# make redis-cluster: the local Redis Cluster of issue 11 (3 primaries + 3 replicas, AOF
# always, data in var/redis-cluster/) alone in the foreground; Ctrl-C stops every node.
# REDIS_CLUSTER=1 make run runs it with the rest of the stack (docs/data-tier.md).
# make cluster-status: every node with its role (make status shows them too).
.PHONY: redis-cluster cluster-status
redis-cluster: setup
	$(PY) -m app.ops.redis_cluster run

cluster-status: setup
	@$(PY) -m app.ops.redis_cluster status
