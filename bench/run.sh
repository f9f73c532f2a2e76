#!/usr/bin/env bash
# `make bench`: the mock provider (zero delay) reached three ways in one run — directly, through
# Sluice, through nginx — with the same load generator, then Sluice's response cache: every
# request a hit, and every request a miss (`Cache-Control: no-cache`: upstream call, recording
# and storing); a table on stdout and BENCHMARKS.md.
#
# Everything runs on 127.0.0.1, every duration is bounded (about 2.5 minutes after the build), and
# every process started here is stopped on exit, failure or Ctrl-C included. Progress goes to
# stderr, the figures to stdout.
#
# Knobs (environment), defaults in brackets:
#   BENCH_RATE [1000]            fixed-rate latency run, requests/s
#   BENCH_DURATION [10]          seconds per measurement
#   BENCH_WARMUP [2]             seconds of warm-up per path
#   BENCH_CONNECTIONS [32]       connections for the warm-up and the fixed-rate run
#   BENCH_MAX_CONNECTIONS [64]   connections for the unthrottled run (half that for the step down)
#   BENCH_OUTPUT [BENCHMARKS.md] where the report goes
#   BENCH_TOOL [oha]             load generator; wrk forces the fallback
#   BENCH_SKIP_BUILD=1           use the binaries already in target/release
#   BENCH_KEEP=1                 keep the temporary folder (logs, raw results); kept on failure anyway
set -euo pipefail
cd "$(dirname "$0")/.."

rate=${BENCH_RATE:-1000}
duration=${BENCH_DURATION:-10}
warmup=${BENCH_WARMUP:-2}
connections=${BENCH_CONNECTIONS:-32}
max_connections=${BENCH_MAX_CONNECTIONS:-64}
step_connections=$((max_connections / 2))   # the one step down when unthrottled is not 100 %
output=${BENCH_OUTPUT:-BENCHMARKS.md}
tool=${BENCH_TOOL:-oha}
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'

log() { printf '== %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- 1. binaries and tools ------------------------------------------------------------------
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=""
apt_install() {
  log "installing $* (apt)"
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq >&2; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "building the release binaries"
  cargo build --release -p sluice -p sluice-mock >&2
fi
for bin in sluice sluice-mock; do
  [ -x "target/release/$bin" ] || die "target/release/$bin is missing: build it first"
done

command -v nginx >/dev/null || apt_install nginx
command -v curl >/dev/null || apt_install curl
if [ "$tool" = oha ] && ! command -v oha >/dev/null; then
  log "installing oha (cargo install oha --locked)"
  cargo install oha --locked >&2 || { log "oha did not build: falling back to wrk"; tool=wrk; }
fi
if [ "$tool" = wrk ] && ! command -v wrk >/dev/null; then apt_install wrk; fi
case $tool in
  oha)
    tool_version=$(oha --version)
    # oha 1.x before --output-format took -j for JSON.
    if oha --help | grep -q -- '--output-format'; then oha_json=(--output-format json); else oha_json=(-j); fi ;;
  wrk) tool_version=$(wrk --version 2>&1 | head -n 1 | cut -d' ' -f1-2 || true) ;;
  *) die "BENCH_TOOL must be oha or wrk, not $tool" ;;
esac

# --- 2. the three servers -------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
pids=()

alive() { kill -0 "$1" 2>/dev/null; }
servers_alive() {
  alive "$mock_pid" || die "the mock exited during the run (see $work/mock.log)"
  alive "$sluice_pid" || die "Sluice exited during the run (see $work/sluice.log)"
  alive "$nginx_pid" || die "nginx exited during the run (see $work/nginx.log, $work/nginx-error.log)"
}
cleanup() {
  local status=$? pid
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do   # up to 5 s for a graceful stop, then force
    local any=""
    for pid in "${pids[@]}"; do if alive "$pid"; then any=1; fi; done
    [ -n "$any" ] || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$status" -eq 0 ] && [ -z "${BENCH_KEEP:-}" ]; then
    rm -rf "$work"
  elif [ "$status" -eq 0 ]; then
    log "logs and raw results kept in $work"
  else
    log "bench failed (exit $status): logs and results kept in $work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Four distinct free ports, below the kernel's ephemeral range (32768 and up by default), so that
# neither client sockets nor the TIME_WAIT leftovers of an earlier run can be holding them.
read -r mock_port proxy_port admin_port nginx_port < <(python3 -c '
import random, socket
ports = []
while len(ports) < 4:
    port = random.randrange(20000, 32000)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: fails if anything holds the port
        except OSError:
            continue
    if port not in ports:
        ports.append(port)
print(*ports)
')

# start NAME COMMAND...: in the background, output to $work/NAME.log; sets $last_pid.
start() {
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
}

# ready NAME URL PID: polls URL until it answers 2xx; fails fast if PID exits, gives up after 30 s.
ready() {
  local name=$1 url=$2 pid=$3 deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
    if ! alive "$pid"; then
      tail -n 20 "$work/$name.log" >&2 || true
      die "$name exited before it was ready"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$work/$name.log" >&2 || true
      die "$name was not ready after 30 s ($url)"
    fi
    sleep 0.1
  done
}

log "starting the mock (:$mock_port), Sluice (:$proxy_port, admin :$admin_port), nginx (:$nginx_port)"
start mock ./target/release/sluice-mock --listen "127.0.0.1:$mock_port" --no-record
mock_pid=$last_pid

sed -e "s/@PROXY_PORT@/$proxy_port/; s/@ADMIN_PORT@/$admin_port/; s/@MOCK_PORT@/$mock_port/" \
  bench/policy.yaml.tmpl >"$work/sluice.yaml"
start sluice env SLUICE_LOG=warn ./target/release/sluice run -c "$work/sluice.yaml"
sluice_pid=$last_pid   # env execs sluice, so this is Sluice's own pid

sed -e "s#@WORK@#$work#g; s/@MOCK_PORT@/$mock_port/; s/@NGINX_PORT@/$nginx_port/" \
  bench/nginx.conf.tmpl >"$work/nginx.conf"
start nginx nginx -c "$work/nginx.conf" -p "$work" -e "$work/nginx-error.log" -g 'daemon off;'
nginx_pid=$last_pid

ready mock "http://127.0.0.1:$mock_port/_mock/health" "$mock_pid"
ready sluice "http://127.0.0.1:$admin_port/readyz" "$sluice_pid"
ready nginx "http://127.0.0.1:$nginx_port/mock/_mock/health" "$nginx_pid"

paths=(direct sluice nginx cache-hit cache-miss)
declare -A urls=(
  [direct]="http://127.0.0.1:$mock_port/v1/chat/completions"
  [sluice]="http://127.0.0.1:$proxy_port/mock/v1/chat/completions"
  [nginx]="http://127.0.0.1:$nginx_port/mock/v1/chat/completions"
  [cache-hit]="http://127.0.0.1:$proxy_port/cached/v1/chat/completions"
  [cache-miss]="http://127.0.0.1:$proxy_port/cached/v1/chat/completions"
)
# The one header a path adds to every request (none for most).
declare -A extra_header=([cache-miss]="cache-control: no-cache")
# curl arguments for a path's extra header.
header_args() { if [ -n "${extra_header[$1]:-}" ]; then printf '%s\n' -H "${extra_header[$1]}"; fi; }
# One real call on each path first: a misrouted path would otherwise only show as 0 % success.
# On the cached route it also stores the entry every later cache-hit request is served from.
for path in "${paths[@]}"; do
  mapfile -t header < <(header_args "$path")
  answer=$(curl -sS --max-time 5 -H 'content-type: application/json' "${header[@]}" -d "$body" "${urls[$path]}") ||
    die "$path: the first chat completion failed"
  case $answer in
    *'"chat.completion"'*) ;;
    *) die "$path: unexpected answer to the first chat completion: ${answer:0:300}" ;;
  esac
done
# And the cache does what each cache path says it measures.
for path in cache-hit cache-miss; do
  mapfile -t header < <(header_args "$path")
  said=$(curl -sS --max-time 5 -o /dev/null -D - -H 'content-type: application/json' "${header[@]}" \
    -d "$body" "${urls[$path]}" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-sluice-cache" { print $2 }')
  want=hit
  if [ "$path" = cache-miss ]; then want=refresh; fi
  [ "$said" = "$want" ] || die "$path: expected x-sluice-cache: $want, got '$said'"
done
sluice_idle_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$sluice_pid/status")

# --- 3. the measurements --------------------------------------------------------------------
# load NAME URL CONNECTIONS SECONDS [RATE [HEADER]]: one run of the load generator -> $work/NAME.json
load() {
  local name=$1 url=$2 conns=$3 secs=$4 qps=${5:-} header=${6:-}
  local limit=$((secs + 30))   # hard bound on one run, whatever the servers do
  if [ "$tool" = oha ]; then
    local pace=() extra=()
    if [ -n "$qps" ]; then pace=(-q "$qps" --latency-correction); fi
    if [ -n "$header" ]; then extra=(-H "$header"); fi
    timeout "$limit" oha --no-tui "${oha_json[@]}" -w -t 5s -m POST \
      -H 'content-type: application/json' "${extra[@]}" -d "$body" \
      -c "$conns" -z "${secs}s" "${pace[@]}" "$url" >"$work/$name.json"
  else
    BENCH_BODY=$body BENCH_HEADER=$header BENCH_RATE=$qps BENCH_CONNECTIONS=$conns BENCH_WRK_OUT="$work/$name.json" \
      timeout "$limit" wrk -t 2 -c "$conns" -d "${secs}s" --timeout 5s -s bench/wrk.lua "$url" \
      >"$work/$name.txt"
  fi
}

# CPU use of the whole machine and of this script's process tree, before and after: the report
# says how much CPU other processes took meanwhile (the bench's figures are only as good as that).
python3 bench/report.py cpu $$ >"$work/cpu-start.json"
for path in "${paths[@]}"; do
  url=${urls[$path]}
  header=${extra_header[$path]:-}
  log "$path: warm-up ${warmup} s"
  load "$path-warmup" "$url" "$connections" "$warmup" "" "$header"
  log "$path: $rate req/s for ${duration} s, $connections connections"
  load "$path-fixed" "$url" "$connections" "$duration" "$rate" "$header"
  log "$path: unthrottled for ${duration} s, $max_connections connections"
  load "$path-max" "$url" "$max_connections" "$duration" "" "$header"
  status=0
  python3 bench/report.py check "$work/$path-max.json" || status=$?
  if [ "$status" -eq 3 ]; then
    log "$path: not every request succeeded; once more with $step_connections connections"
    load "$path-step" "$url" "$step_connections" "$duration" "" "$header"
    python3 bench/report.py check "$work/$path-step.json" || [ $? -eq 3 ]
  elif [ "$status" -ne 0 ]; then
    die "$path: could not read the results"
  fi
  servers_alive
done
python3 bench/report.py cpu $$ >"$work/cpu-end.json"

sluice_hwm_kb=$(awk '/^VmHWM:/ { print $2 }' "/proc/$sluice_pid/status")
printf '{"hwm_kb": %d, "idle_kb": %d}\n' "$sluice_hwm_kb" "$sluice_idle_kb" >"$work/sluice-memory.json"

# --- 4, 5. figures and BENCHMARKS.md --------------------------------------------------------
python3 bench/report.py write "$work" \
  --rate "$rate" --warmup "$warmup" --duration "$duration" --connections "$connections" \
  --max-connections "$max_connections" --step-connections "$step_connections" \
  --body "$body" --tool "$tool" --tool-version "$tool_version" --output "$output"
