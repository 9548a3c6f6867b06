# AECP — the two commands a newcomer needs:
#   make run    install what is missing, start the lab: AOC and 2 clusters of 3 nodes, a demo VM on each
#   make test   install what is missing, run every test (lint, types, unit, integration, e2e)
# System packages come from Debian via apt (needs root); Python packages from PyPI, pinned in
# requirements.lock, into .venv. Both targets are idempotent and fast the second time.

SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
# Patroni's own, on Debian's python3: it runs as user postgres (docs/design/center-ha.md)
HA_VENV := .venv-ha
PY := $(VENV)/bin/python
AECP := $(VENV)/bin/aecp
PYTEST_ARGS ?=

APT_PACKAGES := python3-venv qemu-system-x86 qemu-utils qemu-block-extra busybox-static cpio \
	etcd-server etcd-client syslinux syslinux-common mtools dosfstools kmod curl libnbd-bin fio \
	chromium dnsmasq-base postgresql-15

.PHONY: help run test deps system-deps venv ha-venv image lint typecheck unit functional integration e2e \
	down status \
	bench-storage bench-center bench-migration bench-center-ha

help:
	@echo "make run    start the lab: AOC, 2 clusters of 3 nodes, a demo VM on each"
	@echo "make test   run every test"
	@echo "make down   stop the lab"

deps: system-deps venv ha-venv image

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	lists=$$(ls /var/lib/apt/lists/ 2>/dev/null | grep -c '_Packages' || true); \
	if [ -n "$$missing" ] || [ "$$lists" = 0 ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "missing Debian packages: $$missing"; \
			echo "run as root (sudo make $(MAKECMDGOALS)) or: sudo apt-get update && sudo apt-get install -y $$missing"; \
			exit 1; \
		fi; \
		echo "installing Debian packages: $${missing:-none (refreshing package lists)}"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

ha-venv: $(HA_VENV)/.installed

$(HA_VENV)/.installed: requirements-ha.lock
	@test -x $(HA_VENV)/bin/python || /usr/bin/python3 -m venv $(HA_VENV)
	@$(HA_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-ha.lock
	@touch $@

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

image: venv
	@$(AECP) image build-tiny --if-missing -o json >/dev/null

lint: venv
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest tests/unit -q $(PYTEST_ARGS)

functional: venv
	$(VENV)/bin/pytest tests/functional -q $(PYTEST_ARGS)

integration: deps
	$(VENV)/bin/pytest tests/integration -q $(PYTEST_ARGS)

e2e: deps
	$(VENV)/bin/pytest tests/e2e -q $(PYTEST_ARGS)

# the unit and functional tiers (in-process, no shared ports) run on every core; the lab tiers
# one module after another (each starts its own etcd, agents and QEMU)
test: deps lint typecheck
	$(VENV)/bin/pytest tests/unit tests/functional -q -n auto $(PYTEST_ARGS)
	$(VENV)/bin/pytest tests/integration tests/e2e -q $(PYTEST_ARGS)

run: deps
	@if $(AECP) lab status >/dev/null 2>&1; then \
		echo "a lab is already running:"; $(AECP) lab status; \
	else \
		$(AECP) lab up --clusters 2 --demo; \
	fi
	@center=$$($(AECP) lab status -o json | $(PY) -c 'import json,sys; s=json.load(sys.stdin); print(s["center"]["url"] if isinstance(s, dict) else "")'); \
	if [ -z "$$center" ]; then echo "(this lab is a single cluster without a center: 'aecp lab down', then 'make run')"; exit 0; fi; \
	pw=$$($(AECP) lab status -o json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["center"]["password_file"])'); \
	echo; \
	echo "The lab is up: the operation center and 2 clusters of 3 nodes (c1 in dc1 on 127.0.1.1-3,"; \
	echo "c2 in dc2 on 127.0.2.1-3), a demo VM on each; the CLI is logged in to the center as root."; \
	echo "  web console:   $$center/   (user root)"; \
	echo "  root password file: $$pw"; \
	echo "Next:"; \
	echo "  export PATH=$$PWD/$(VENV)/bin:\$$PATH     # put 'aecp' on your PATH"; \
	echo "  aecp center cluster list            # c1 and c2, their data centers, their sync state"; \
	echo "  aecp vm list                        # the demo VMs of both clusters (a CLUSTER column)"; \
	echo "  aecp --cluster c2 node list         # c2's nodes (every command goes through the center)"; \
	echo "  aecp --cluster c1 vm console demo --log   # what c1's demo VM printed on its console"; \
	echo "  aecp --cluster c2 vm create web --memory 256   # another VM: a task with a progress bar"; \
	echo "  aecp center task list / alert list / audit     # tasks, open alerts, who did what"; \
	echo "  aecp lab status / aecp lab down     # the lab's processes / stop everything"

bench-storage: deps
	$(PY) benchmarks/storage.py $(BENCH_ARGS)

bench-center: venv
	$(PY) benchmarks/center.py $(BENCH_ARGS)

bench-migration: deps
	$(PY) benchmarks/migration.py $(BENCH_ARGS)

bench-center-ha: deps
	$(PY) benchmarks/center_ha.py $(BENCH_ARGS)

status: venv
	@$(AECP) lab status

down: venv
	@$(AECP) lab down
