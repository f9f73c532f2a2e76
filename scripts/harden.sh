#!/usr/bin/env bash
# `make harden`: every hardening check at full size; HARDENING.md records a run's figures.
# `make test` runs each at a short size (the same tests, smaller knobs).
#
# Knobs (environment), defaults in brackets:
#   HARDEN_FUZZ_SECS [120]   libFuzzer time per fuzz target
#   HARDEN_SOAK_SECS [1800]  soak length
#   HARDEN_SKIP_SOAK=1       leave the soak out (it is the long part)
# Output: progress on stderr; each step's log in target/harden/.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzz_secs=${HARDEN_FUZZ_SECS:-120}
soak_secs=${HARDEN_SOAK_SECS:-1800}
logs=target/harden
mkdir -p "$logs"
log() { printf '== %s\n' "$*" >&2; }

step() {
  local name=$1; shift
  log "$name"
  if "$@" >"$logs/$name.log" 2>&1; then
    grep -hE '^(smuggling corpus|reload storm|abuse|upstream faults|soak|slowhttptest|policy|request_facts|sse|cache_key|headers):|stream=' "$logs/$name.log" >&2 || true
  else
    log "$name FAILED: see $logs/$name.log"; tail -n 40 "$logs/$name.log" >&2; exit 1
  fi
}

# 1. Request smuggling: the corpus five times over, in shifted orders.
step smuggling env SLUICE_HARDEN_ROUNDS=5 cargo test --test smuggling -- --nocapture
# 2. Fuzzing: libFuzzer, coverage-guided (cargo-fuzz needs nightly features: RUSTC_BOOTSTRAP).
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in policy request_facts sse cache_key headers upstream_response; do
  corpus=target/harden/corpus/$target
  mkdir -p "$corpus" "fuzz/regressions/$target"
  log "fuzz $target (${fuzz_secs}s)"
  if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "../$corpus" "corpus/$target" \
        -- -max_total_time="$fuzz_secs" -rss_limit_mb=4096 >"../$logs/fuzz-$target.log" 2>&1); then
    # A crash input is kept as a regression case, replayed by every `make test` from now on.
    cp fuzz/artifacts/"$target"/crash-* "fuzz/regressions/$target/" 2>/dev/null || true
    log "fuzz $target FOUND A CRASH: kept in fuzz/regressions/$target; see $logs/fuzz-$target.log"
    exit 1
  fi
  grep -E '^Done [0-9]+ runs' "$logs/fuzz-$target.log" | sed "s/^/$target: /" >&2 || true
done
# 3. Resource abuse: slowhttptest against a real sidecar, then the abuse tests at 5x (1500
#    idle, 500 slow heads, 250 slow bodies, 1000 open streams).
command -v slowhttptest >/dev/null || { sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo;
  $sudo_ apt-get install -y -qq slowhttptest >/dev/null; }
step slowhttptest bash scripts/slowhttptest.sh
step abuse env SLUICE_HARDEN_SCALE=5 cargo test --test abuse -- --nocapture
# 4. Upstream faults at 10x.
step upstream-faults env SLUICE_HARDEN_SCALE=10 cargo test --test upstream_faults -- --nocapture
# 5. Reload storm: 1000 reloads under load.
step reload-storm env SLUICE_HARDEN_RELOADS=1000 cargo test --test reload_storm -- --nocapture
# 6. Limits across three replicas on a real Redis.
step redis-limits cargo test --test redis_limits
# 7. Isolation and SSRF (the forward listener's own rules are in tests/forward.rs).
step ssrf cargo test --test ssrf --test cache
# 8. Secret leakage: canary keys through every path, most verbose logs, tracing on.
step canary cargo test --test telemetry canary_keys_never_leak
# 9. Soak.
if [ -z "${HARDEN_SKIP_SOAK:-}" ]; then
  step soak env SLUICE_SOAK_SECS="$soak_secs" cargo test --test soak -- --nocapture
fi
# 10. Supply chain.
step supply-chain make supply-chain
log "all hardening checks held"
