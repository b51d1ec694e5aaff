# PhoneShop: two commands.
#   make run    install what is missing, then run the whole stack in the foreground
#   make test   install what is missing, then run the test suite
#   make status is every process of a running `make run` stack up? (exit 1 if not)
# Every target is idempotent: a second run only does what is still missing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Touched after every successful `pip install`; pip runs again only when
# pyproject.toml is newer than it.
STAMP := $(VENV)/.installed-from-pyproject
EXTRAS := test,dev,load
PYTEST_ARGS ?=

# System binaries, each from the Debian package of the same name.
# chromium: the headless browser of the /live page test (tests/test_live.py).
SYSTEM_BINARIES := redis-server nginx wrk chromium
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: help setup system-packages run test lint status

help:
	@echo "make run    start redis, the app instances and nginx in the foreground (Ctrl-C stops all)"
	@echo "make test   run the test suite (PYTEST_ARGS='-k name' to narrow it)"
	@echo "make lint   ruff check and ruff format --check"
	@echo "make status the health of every process of a running make run stack (exit 1 if one is down)"
	@echo "make setup  only install what is missing (apt packages, .venv)"

setup: system-packages $(STAMP)

system-packages:
	@missing=""; \
	for binary in $(SYSTEM_BINARIES); do \
	  command -v "$$binary" >/dev/null 2>&1 || missing="$$missing $$binary"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing with apt-get:$$missing"; \
	  if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then $(SUDO) apt-get update; fi; \
	  $(APT_INSTALL) $$missing || { $(SUDO) apt-get update && $(APT_INSTALL) $$missing; }; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(VENV)/bin/pip install -e '.[$(EXTRAS)]'
	@touch $@

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# make run:
#  1. writes a random ADMIN_TOKEN into .env when neither the environment nor
#     .env has one, and prints it (only then);
#  2. loads .env (as honcho does: .env wins over the environment), derives
#     REDIS_URL from REDIS_PORT when unset, prints every URL and where logs
#     and data go;
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
	export REDIS_PORT="$${REDIS_PORT:-6379}"; \
	export REDIS_URL="$${REDIS_URL:-redis://127.0.0.1:$$REDIS_PORT/0}"; \
	export BEHIND_PROXY="$${BEHIND_PROXY:-1}"; \
	export WEB_ACCESS_LOG="$${WEB_ACCESS_LOG:-var/log/web-access.log}"; \
	export MAIL_METRICS_PORT="$${MAIL_METRICS_PORT:-9101}"; \
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
	echo "  redis           $$REDIS_URL"; \
	echo "  metrics         $$(url "$$http" /metrics) from this box (elsewhere: the admin token)"; \
	echo "                  per instance:$$scrape; mail worker: $$(url "$$MAIL_METRICS_PORT" /metrics)"; \
	if [ -z "$${SMTP_HOST:-}" ]; then \
	  export SMTP_HOST=127.0.0.1 SMTP_PORT="$${SMTP_PORT:-1025}"; procs="redis web nginx mail smtp"; \
	  echo "  mail            dev SMTP sink 127.0.0.1:$$SMTP_PORT, every mail saved in $${MAIL_SINK_DIR:-var/mail}/"; \
	else \
	  procs="redis web nginx mail"; \
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
	echo "  data            redis AOF in var/redis/; rendered nginx config var/nginx/nginx.conf"; \
	echo; \
	exec $(VENV)/bin/honcho start -f Procfile -c "mail=$$mail_workers" $$procs

# make status: app/status.py reads .env and make run's defaults as above, checks
# redis, every instance, nginx, the mail worker, its backlog and dead letters,
# the SMTP server, and exits 1 when one of them is down.
status: $(STAMP)
	@$(PY) -m app.status

# make loadtest: a bounded headless Locust run against a fresh stack, then the
# verifier (loadtests/__main__.py). make bench: the measurements, written to
# loadtests/reports/ and published to docs/BENCH.md + docs/bench.png, which the
# repository keeps (loadtests/bench.py). Both pin the stack and the load
# generator to disjoint CPUs: STACK_CPUS=0 LOAD_CPUS=1 by default on 2 cores
# (loadtests/rig.py). Each under 10 minutes.
.PHONY: loadtest bench
loadtest: setup
	$(PY) -m loadtests

bench: setup
	$(PY) -m loadtests.bench --publish docs

# make soak: SOAK_SECONDS (default 300) of mixed traffic with faults on a seeded
# schedule against a fresh stack, then the books (loadtests/soak.py). Replay a
# run with SOAK_SEED=<the seed it printed>.
.PHONY: soak
soak: setup
	$(PY) -m loadtests.soak

# make redis-cluster: the local Redis Cluster of issue 11 (3 primaries + 3 replicas, AOF
# always, data in var/redis-cluster/) in the foreground; Ctrl-C stops every node. The app
# does not use it yet (docs/data-tier.md). make cluster-status: every node with its role.
.PHONY: redis-cluster cluster-status
redis-cluster: setup
	$(PY) -m ops.redis_cluster run

cluster-status: $(STAMP)
	@$(PY) -m ops.redis_cluster status
