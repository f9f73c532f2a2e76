# Sluice — the two commands a newcomer needs are `make run` and `make test`.

CARGO     ?= cargo
POLICY    ?= conf/sluice.yaml
VENV      := .venv
# One build command for every release use (run, demo, bench): building the two binaries
# together keeps dependency features identical, so none of them rebuilds the others' work.
RELEASE   := $(CARGO) build --release -p sluice -p sluice-mock

.PHONY: run test deps build release lint unit sdk supply-chain manifests harden demo bench bench-deps bench-smoke check fmt clean

## run: build (release) and start the sidecar with $(POLICY), state in memory.
run: deps
	$(RELEASE)
	./target/release/sluice run -c $(POLICY)

# The RustSec advisory database, an offline snapshot (its usual fetch cannot reach its host).
ADVISORY_DB ?= $(firstword $(wildcard ../shared/advisory-db /work/shared/advisory-db) ../shared/advisory-db)

## test: install what is missing, then lint, unit/integration tests (the hardening checks at a
## short size among them), SDK tests, the supply-chain checks, the Kubernetes manifests and the
## bench's smoke run (the whole benchmark harness in a few seconds, no thresholds on time).
test: deps lint unit sdk supply-chain manifests bench-smoke

## deps: install missing system packages, Rust components and the Python venv.
deps:
	@bash scripts/install-deps.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

## sdk: the official openai and anthropic Python SDKs through the real sidecar.
sdk:
	$(CARGO) build --workspace --bins
	$(VENV)/bin/python -m pytest -q tests/sdk

## manifests: render deploy/kubernetes (base, overlays) and check it without a cluster:
## Kubernetes schemas, references, `sluice check` on its policies, and deploy/Dockerfile.
manifests:
	$(CARGO) build --workspace --bins
	$(VENV)/bin/python deploy/kubernetes/validate.py target/debug/sluice

## supply-chain: known vulnerabilities (cargo audit, offline database), licenses, banned
## crates and sources (cargo deny). Ignored advisories are explained in HARDENING.md.
supply-chain:
	@test -d $(ADVISORY_DB) || { echo "no advisory database at $(ADVISORY_DB)"; exit 1; }
	cargo audit --db $(ADVISORY_DB) --no-fetch --deny warnings
	@# cargo deny reads the metadata of every platform's dependencies, which a build for this
	@# one never downloads: fetch them first (from the registry), so --offline finds them.
	$(CARGO) fetch --locked
	cargo deny --offline check licenses bans sources

## harden: every hardening check at full size (fuzzing, 1000 reloads, 30 min soak, …); see
## HARDENING.md. Not part of `make test`, which runs each at a short size.
harden: deps
	bash scripts/harden.sh

## check: validate a policy file (POLICY=...).
check:
	$(CARGO) run --quiet -p sluice -- check $(POLICY)

## demo: the mock provider and the sidecar, a normal call, a streamed call and a reload.
demo: deps
	$(RELEASE)
	bash scripts/demo.sh

## bench: every path side by side in interleaved rounds (direct, nginx, a bare Pingora proxy,
## Sluice passthrough, full chain with tracing on and off, cache hit, LiteLLM, Portkey); writes
## BENCHMARKS.md. Builds the `production` profile the container image ships (fat LTO: about
## 15 minutes the first time), then measures for about 30 minutes; the knobs (BENCH_ROUNDS, BENCH_HOLD, BENCH_PHASES, …) are listed in bench/suite.py.
bench: deps bench-deps
	python3 bench/suite.py

## bench-deps: the peer gateways the bench compares with (LiteLLM from PyPI, Portkey from npm),
## each pinned, in bench-out/peers; one that cannot be installed is skipped and reported.
bench-deps:
	@bash bench/install-peers.sh

## bench-smoke: the whole bench at toy sizes on the debug build (seconds): proves the harness,
## the stream client and every Sluice configuration it runs still work; judges no timing.
bench-smoke:
	$(CARGO) build -p sluice -p sluice-mock -p sluice-bench-streams -p sluice-bench-floor
	BENCH_SMOKE=1 BENCH_PROFILE=debug BENCH_SKIP_BUILD=1 python3 bench/suite.py

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV)
