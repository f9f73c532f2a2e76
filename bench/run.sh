#!/usr/bin/env bash
# `make bench`: the mock provider (zero delay) reached three ways in one run — directly, through
# Sluice, through nginx — with the same load generator (oha), then BENCHMARKS.md.
# Everything runs on this machine's loopback; durations are bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${BENCH_DURATION:-10s}        # per measurement
rate=${BENCH_RATE:-1000}               # fixed-rate latency run, requests/s
connections=${BENCH_CONNECTIONS:-32}   # fixed-rate run
max_connections=${BENCH_MAX_CONNECTIONS:-64}

cargo build --release -p sluice -p sluice-mock
if ! command -v oha >/dev/null; then
  cargo install oha --locked
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx_bin" ] || { echo "nginx is missing: make deps" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port); nginx_port=$(free_port)

wait_for() { # url, what
  for _ in $(seq 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$2 did not start" >&2
  exit 1
}

./target/release/sluice-mock --listen "127.0.0.1:$mock_port" --no-record >/dev/null &
pids+=($!)
sed -e "s/@PROXY_PORT@/$proxy_port/; s/@ADMIN_PORT@/$admin_port/; s/@MOCK_PORT@/$mock_port/" \
  bench/policy.yaml.tmpl >"$work/sluice.yaml"
SLUICE_LOG=warn ./target/release/sluice run -c "$work/sluice.yaml" 2>"$work/sluice.log" &
sluice_pid=$!
pids+=("$sluice_pid")
sed -e "s#@WORK@#$work#g; s/@MOCK_PORT@/$mock_port/; s/@NGINX_PORT@/$nginx_port/" \
  bench/nginx.conf.tmpl >"$work/nginx.conf"
"$nginx_bin" -c "$work/nginx.conf" -p "$work" -g 'daemon off;' 2>"$work/nginx.stderr" &
pids+=($!)

wait_for "http://127.0.0.1:$mock_port/_mock/health" "the mock"
wait_for "http://127.0.0.1:$admin_port/readyz" "sluice"
wait_for "http://127.0.0.1:$nginx_port/mock/_mock/health" "nginx"

body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark"}]}'
load() { # name url extra-args...
  local name=$1 url=$2; shift 2
  oha --no-tui --output-format json -m POST -H 'content-type: application/json' -d "$body" "$@" "$url" \
    >"$work/$name.json"
}

declare -A urls=(
  [direct]="http://127.0.0.1:$mock_port/v1/chat/completions"
  [sluice]="http://127.0.0.1:$proxy_port/mock/v1/chat/completions"
  [nginx]="http://127.0.0.1:$nginx_port/mock/v1/chat/completions"
)
for path in direct sluice nginx; do
  url=${urls[$path]}
  echo "== $path: warm-up, ${rate} req/s for $duration, then unthrottled for $duration" >&2
  load "$path-warmup" "$url" -z 2s -c "$connections"
  load "$path-fixed" "$url" -z "$duration" -c "$connections" -q "$rate" --latency-correction
  load "$path-max" "$url" -z "$duration" -c "$max_connections"
done
grep -E 'VmHWM|VmRSS' "/proc/$sluice_pid/status" | tr -s ' \t' ' ' >"$work/sluice-memory.txt"

python3 bench/report.py "$work" \
  --rate "$rate" --duration "$duration" --connections "$connections" \
  --max-connections "$max_connections" --body "$body" --output BENCHMARKS.md
