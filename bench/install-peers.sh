#!/usr/bin/env bash
# Installs the peer gateways `make bench` compares Sluice with, into bench-out/peers (ignored by
# git), each pinned to one version: LiteLLM's proxy from PyPI in a venv of its own, Portkey's
# gateway from npm. Does nothing for a peer already there; a peer that cannot be installed is
# reported and skipped (the bench then says so), never fatal.
#
# litellm is pinned to 1.82.6: 1.82.7 and 1.82.8 were published with a credential stealer
# (March 2026) and a later release was withdrawn too; 1.82.6 is the release projects pinned to.
set -uo pipefail
cd "$(dirname "$0")/.."

LITELLM_VERSION=1.82.6
PORTKEY_VERSION=1.15.2
peers=bench-out/peers
mkdir -p "$peers"

if [ -x "$peers/litellm/bin/litellm" ] && [ "$(cat "$peers/litellm/VERSION" 2>/dev/null)" = "$LITELLM_VERSION" ]; then
  :
else
  echo "installing litellm[proxy]==$LITELLM_VERSION (PyPI) into $peers/litellm"
  rm -rf "$peers/litellm"
  if python3 -m venv "$peers/litellm" &&
    "$peers/litellm/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION"; then
    echo "$LITELLM_VERSION" >"$peers/litellm/VERSION"
  else
    echo "litellm could not be installed: the bench will skip it" >&2
    rm -rf "$peers/litellm"
  fi
fi

portkey_main=$peers/portkey/node_modules/@portkey-ai/gateway/build/start-server.js
if [ -f "$portkey_main" ] && [ "$(cat "$peers/portkey/VERSION" 2>/dev/null)" = "$PORTKEY_VERSION" ]; then
  :
elif command -v npm >/dev/null; then
  echo "installing @portkey-ai/gateway@$PORTKEY_VERSION (npm) into $peers/portkey"
  rm -rf "$peers/portkey"
  mkdir -p "$peers/portkey"
  if (cd "$peers/portkey" && npm init -y >/dev/null &&
    npm install --silent --no-audit --no-fund "@portkey-ai/gateway@$PORTKEY_VERSION" >/dev/null); then
    echo "$PORTKEY_VERSION" >"$peers/portkey/VERSION"
  else
    echo "the Portkey gateway could not be installed: the bench will skip it" >&2
    rm -rf "$peers/portkey"
  fi
else
  echo "npm is missing: the bench will skip the Portkey gateway" >&2
fi
exit 0
