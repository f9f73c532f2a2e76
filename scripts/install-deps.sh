#!/usr/bin/env bash
# Installs what building and testing Sluice needs and is missing; does nothing when all is there.
# Debian packages: cmake (libz-ng-sys), pkg-config + libssl-dev (Pingora's openssl feature),
# redis-server (shared-state tests), nginx (benchmark reference), python3-venv, openssl and curl
# (HTTPS_PROXY tests: test certificates, curl as a client).
# Cargo tools: cargo-audit and cargo-deny (supply-chain checks); oha, the benchmark's load
# generator (its smoke run is part of `make test`).
# Python: a venv in .venv with the official SDKs the end-to-end tests drive, and what
# deploy/kubernetes/validate.py checks the manifests with.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v cc >/dev/null || need+=(build-essential)
command -v make >/dev/null || need+=(make)   # jemalloc is built from source by tikv-jemalloc-sys
command -v openssl >/dev/null || need+=(openssl)   # TLS upstream test certificates
command -v curl >/dev/null || need+=(curl ca-certificates)   # HTTPS_PROXY tests' client
dpkg -s ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)   # the system roots, bundle and hashed directory
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# oha, pinned: the bench reads its JSON output. A few minutes to build once.
OHA_VERSION=1.16.0
if ! command -v oha >/dev/null || [ "$(oha --version | cut -d' ' -f2)" != "$OHA_VERSION" ]; then
  cargo install oha --locked --version "$OHA_VERSION"
fi

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
# Supply-chain checks of `make test` (each takes a few minutes to build, once).
command -v cargo-audit >/dev/null || cargo install cargo-audit --version 0.22.2 --locked
command -v cargo-deny >/dev/null || cargo install cargo-deny --version 0.20.2 --locked

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import openai, anthropic, boto3, pytest, httpx' 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
fi
if ! .venv/bin/python -c 'import kubernetes_validate, yaml, dockerfile' 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r deploy/kubernetes/requirements.txt
fi
