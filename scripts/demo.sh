#!/usr/bin/env bash
# `make demo`: the mock provider and the sidecar with conf/examples/demo.yaml, then a normal
# call, a streamed call and a live reload, shown with curl.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
cp conf/examples/demo.yaml "$work/sluice.yaml"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

./target/release/sluice-mock --listen 127.0.0.1:9900 --chunk-ms 150 >/dev/null &
pids+=($!)
SLUICE_LOG=${SLUICE_LOG:-info} ./target/release/sluice run -c "$work/sluice.yaml" 2>"$work/sluice.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:19787/readyz >/dev/null 2>&1 && curl -fsS http://127.0.0.1:9900/_mock/health >/dev/null 2>&1 && break
  sleep 0.1
done

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "A normal call (OPENAI_BASE_URL=http://127.0.0.1:18787/openai/v1)"
curl -sS -i http://127.0.0.1:18787/openai/v1/chat/completions \
  -H 'authorization: Bearer sk-caller' -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello, Sluice"}]}'
echo
step "What the provider received (the caller's key replaced by the upstream's)"
curl -sS http://127.0.0.1:9900/_mock/requests | python3 -c 'import json,sys; r=json.load(sys.stdin)[-1]; print(r["path"], "authorization:", r["headers"].get("authorization"))'

step "A streamed call: chunks arrive as the provider sends them (150 ms apart)"
curl -sS -N http://127.0.0.1:18787/openai/v1/chat/completions \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Stream this"}]}' \
  | while IFS= read -r line; do if [ -n "$line" ]; then printf '%s  %s\n' "$(date +%T.%3N)" "${line:0:110}"; fi; done

step "Reload: add a route /v2 by editing the policy file (the watcher picks it up)"
curl -sS http://127.0.0.1:19787/admin/policy | python3 -c 'import json,sys; p=json.load(sys.stdin); print("before:", p["hash"][:12], p["summary"])'
cat >>"$work/sluice.yaml" <<'YAML'
  - name: v2
    match: { path_prefix: /v2 }
    rewrite_prefix: /v1
    upstream: mock-openai
YAML
sleep 0.5
curl -sS http://127.0.0.1:19787/admin/policy | python3 -c 'import json,sys; p=json.load(sys.stdin); print("after: ", p["hash"][:12], p["summary"])'
curl -sS http://127.0.0.1:18787/v2/chat/completions -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"via the new route"}]}'
echo

step "An invalid edit is refused and the running policy stays"
echo "  colour: blue" >>"$work/sluice.yaml"
curl -sS -X POST http://127.0.0.1:19787/admin/reload | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["result"], "-", r["errors"][0])'

step "Access log"
grep access "$work/sluice.log" | tail -4 || true
