#!/usr/bin/env bash
# Slow clients from slowhttptest (slowloris heads, then slow bodies) against a real sidecar,
# while a legitimate caller sends a request every 100 ms: every legitimate request must succeed
# and the sidecar must be alive at the end. Used by `make harden`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p sluice -p sluice-mock
dir=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
target/debug/sluice-mock --listen "127.0.0.1:$mock_port" --no-record >"$dir/mock.log" 2>&1 &
pids+=($!)
cat >"$dir/sluice.yaml" <<YAML
listen: { proxy: 127.0.0.1:$proxy_port, admin: 127.0.0.1:$admin_port }
server: { client_body_timeout: 20s }
upstreams:
  openai: { provider: openai, base_url: "http://127.0.0.1:$mock_port" }
routes:
  - { name: openai, match: { path_prefix: /openai }, upstream: openai }
YAML
SLUICE_LOG=warn target/debug/sluice run -c "$dir/sluice.yaml" >"$dir/sluice.log" 2>&1 &
sluice_pid=$!
pids+=($sluice_pid)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$admin_port/readyz" >/dev/null && break; sleep 0.1; done

url="http://127.0.0.1:$proxy_port/openai/v1/chat/completions"
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"legit"}]}'
legit() {
  local ok=0 failed=0
  while [ ! -e "$dir/stop" ]; do
    if curl -fs -m 5 -H 'content-type: application/json' -d "$body" "$url" >/dev/null; then
      ok=$((ok + 1)); else failed=$((failed + 1)); fi
    sleep 0.1
  done
  echo "$ok $failed" >"$dir/legit"
}
legit &
legit_pid=$!
# Slowloris: 1000 connections sending headers slowly; then 1000 sending the body slowly.
slowhttptest -H -c 1000 -r 200 -i 10 -l 30 -u "$url" -t POST -p 3 -o "$dir/slowloris" >"$dir/h.log" 2>&1 || true
slowhttptest -B -c 1000 -r 200 -i 10 -l 30 -s 100000 -u "$url" -t POST -p 3 -o "$dir/slowbody" >"$dir/b.log" 2>&1 || true
touch "$dir/stop"; wait "$legit_pid"
read -r ok failed <"$dir/legit"
alive=yes; kill -0 "$sluice_pid" 2>/dev/null || alive=no
for phase in h b; do
  # slowhttptest's last status block: connected, closed, service available (colours removed).
  sed 's/\x1b\[[0-9;]*m//g' "$dir/$phase.log" | grep -E '^(connected|closed|service available)' | tail -n 3 | tr -s ' ' | paste -sd ';' || true
done
echo "slowhttptest: legitimate requests during slowloris and slow bodies: $ok ok, $failed failed; sidecar alive: $alive"
[ "$failed" -eq 0 ] && [ "$ok" -gt 0 ] && [ "$alive" = yes ]
