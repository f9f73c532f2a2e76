# Sluice — the two commands a newcomer needs are `make run` and `make test`.

CARGO     ?= cargo
POLICY    ?= conf/sluice.yaml
VENV      := .venv
# One build command for every release use (run, demo, bench): building the two binaries
# together keeps dependency features identical, so none of them rebuilds the others' work.
RELEASE   := $(CARGO) build --release -p sluice -p sluice-mock

.PHONY: run test deps build release lint unit sdk supply-chain manifests harden demo bench check fmt clean

## run: build (release) and start the sidecar with $(POLICY), state in memory.
run: deps
	$(RELEASE)
	./target/release/sluice run -c $(POLICY)

# The RustSec advisory database, an offline snapshot (its usual fetch cannot reach its host).
ADVISORY_DB ?= $(firstword $(wildcard ../shared/advisory-db /work/shared/advisory-db) ../shared/advisory-db)

## test: install what is missing, then lint, unit/integration tests (the hardening checks at a
## short size among them), SDK tests, the supply-chain checks and the Kubernetes manifests.
test: deps lint unit sdk supply-chain manifests

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

## bench: direct vs Sluice vs nginx, side by side; writes BENCHMARKS.md. Not part of `make test`.
bench: deps
	bash bench/run.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV)
