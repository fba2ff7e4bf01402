# tapnbd: `make run` serves a demo image, `make test` sets everything up and runs the checks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 10809
DEMO   := var/demo.qcow

# Debian packages the tests and benchmarks use: the real clients, the peers, FUSE and
# the kernel VM harness (../shared/kernel-vm/run-guest).
SYSTEM_PACKAGES := qemu-utils libnbd-bin python3-libnbd nbdfuse fio fuse3 e2fsprogs \
	nbdkit nbd-server nbd-client bonnie++ nocache util-linux procps \
	qemu-system-x86 busybox-static kmod cpio socat libvhdi-utils curl

.PHONY: run test deps venv lint typecheck pytest bench crash soak fuzz mutate clean docs

run: $(BIN)/tapnbd
	@mkdir -p var
	@test -e $(DEMO) || $(BIN)/tapnbd create $(DEMO) --size 1G
	@echo "Serving $(DEMO) on nbd://$(HOST):$(PORT)/ (Ctrl-C stops it)"
	@echo "  look at it:  nbdinfo nbd://$(HOST):$(PORT)/   (or: nbdinfo --map nbd://$(HOST):$(PORT)/)"
	@echo "  mount it:    mkdir -p /tmp/nbd && nbdfuse /tmp/nbd nbd://$(HOST):$(PORT)/ &"
	@echo "               losetup -f --show /tmp/nbd/nbd   # then mkfs.ext4 and mount the /dev/loopN it prints"
	@echo "     or, with this server stopped:  $(BIN)/tapnbd attach $(DEMO)   (the daemon serves it)"
	exec $(BIN)/tapnbd serve $(DEMO) --bind $(HOST) --port $(PORT) --description "tapnbd demo image"

# A throwaway single-node Ceph for the rbd tests (tests/rbd/cluster.py), and qemu's rbd:
# driver as their referee. Without recommends: the rest of Ceph is 10x the size.
CEPH_PACKAGES := ceph-mon ceph-osd ceph-common qemu-block-extra

deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	ceph=$$(for p in $(CEPH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing$$ceph" ]; then \
		echo "installing: $$missing $$ceph"; \
		apt-get update -qq; \
	fi; \
	if [ -n "$$missing" ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi; \
	if [ -n "$$ceph" ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$ceph >/dev/null; \
	fi

$(BIN)/tapnbd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/tapnbd

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# Two workers (pytest-xdist), each test module whole on one (its module fixtures are
# made once); the kernel VM's first boot is locked (tests/kernel/vm.py).
PYTEST_WORKERS ?= -n 2 --dist loadfile

pytest: venv
	$(BIN)/pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test: deps venv lint typecheck pytest

BENCH_ARGS ?= all

bench: deps venv
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

# Reliability (issue 8): kill -9 during writes, 50 rounds per qcow layout plus 10 kills
# of the daemon; and 100 fio connections with crc32c verification for 60 s, RSS checked.
CRASH_ARGS ?= --rounds 50 --daemon 10
SOAK_ARGS ?= --connections 100 --duration 60

# Simulated power loss (issue 18): crash states under the qcow driver, per layout.
POWERLOSS_ARGS ?= --states 3000

crash: deps venv
	$(BIN)/python -m tests.reliability.powerloss $(POWERLOSS_ARGS)
	$(BIN)/python -m tests.reliability.crash $(CRASH_ARGS)

soak: deps venv
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# Fuzzing (issue 8): FUZZ_RUNS inputs into the NBD codec (coverage-guided by atheris, the
# optional `fuzz` extra) and mutated qcow images; make test runs a short budget of both.
FUZZ_RUNS ?= 1000000
QCOW_FUZZ_RUNS ?= 20000

fuzz: deps venv
	$(BIN)/pip install -q -e '.[dev,fuzz]' || echo "atheris did not install: random mutation only"
	$(BIN)/python -m tests.fuzz nbd --runs $(FUZZ_RUNS)
	$(BIN)/python -m tests.fuzz qcow --runs $(QCOW_FUZZ_RUNS)

# Mutation testing (issue 18): one mutant at a time (a flipped comparison or operator, a
# changed constant, a deleted call) in a scratch copy of the checkout, against each core
# module's fast tests (tests/mutate.py: TARGETS); prints the score and every survivor.
# Not part of make test. E.g. MUTATE_ARGS="tapnbd/backend.py --budget 300".
MUTATE_ARGS ?= --budget 600

mutate: deps venv
	$(BIN)/python -m tests.mutate $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache

# The command reference, generated from the CLI (a test checks it is up to date).
docs: venv
	$(BIN)/python -m tapnbd.cli.docs --output docs/commands.md
