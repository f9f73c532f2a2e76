"""Writes BENCHMARKS.md from the results of bench/suite.py (bench-out/last/results.json).

    python3 bench/report.py RESULTS.json [OUTPUT]    re-render a report from kept results

Standard library only. Every figure in the report comes from the results file; the targets are
issue 9's, judged here with the margin by which each is met or missed.
"""

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from policies import LADDER

LABELS = {
    "direct": "direct to the mock",
    "nginx": "nginx (reference proxy)",
    "floor": "Pingora floor (a bare Pingora proxy)",
    "pass": "Sluice passthrough (no filters)",
    "full": "Sluice full chain, tracing on",
    "full-notrace": "Sluice full chain, tracing off",
    "hit": "Sluice cache hit (full chain)",
    "litellm": "LiteLLM proxy",
    "portkey": "Portkey gateway",
}


def machine() -> dict:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown"

    def run(*cmd: str) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (done.stdout + done.stderr).strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    mem = first("/proc/meminfo", "MemTotal")
    commit = run("git", "rev-parse", "--short", "HEAD")
    if not commit or " " in commit:
        commit = "unknown"
    elif run("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "cpus": run("nproc") or "?",
        "cpu": first("/proc/cpuinfo", "model name"),
        "memory": f"{int(mem.split()[0]) / 1024 / 1024:.0f} GiB" if mem[:1].isdigit() else "unknown",
        "kernel": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "rustc": run("rustc", "--version") or "unknown",
        "nginx": run("nginx", "-v").replace("nginx version: nginx/", "") or "unknown",
    }


def other_load(results: dict) -> float | None:
    """Average CPU cores used by processes outside the bench during the measurements."""
    try:
        start, end = results["machine_start"], results["machine_end"]
        wall = end["wall"] - start["wall"]
        return max((end["busy"] - start["busy"]) - (end["ours"] - start["ours"]), 0.0) / wall
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def stolen(results: dict) -> float | None:
    """Average CPU cores the hypervisor ran something else on while the bench's were ready
    (`steal` in /proc/stat) during the measurements; runs before it was recorded have none."""
    try:
        start, end = results["machine_start"], results["machine_end"]
        return max(end["steal"] - start["steal"], 0.0) / (end["wall"] - start["wall"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def us(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.0f}" if signed else f"{value:.0f}"


def pct(success: float, all_ok: bool) -> str:
    text = f"{success:.2f} %"
    return "99.99+ %" if text == "100.00 %" and not all_ok else text


def mib(kb: float) -> str:
    return f"{kb / 1024:.1f}"


class Verdicts:
    """The targets of issue 9 with their figures: met or not, and by how much."""

    def __init__(self) -> None:
        self.rows: list = []

    def at_most(self, what: str, value: float | None, limit: float, unit: str, why: str = "") -> None:
        if value is None:
            self.rows.append([what, "not measured", f"≤ {limit:g} {unit}", "—", why])
            return
        met = value <= limit
        margin = f"{limit - value:.1f} {unit} under" if met else f"{value - limit:.1f} {unit} over"
        self.rows.append([what, f"{value:.1f} {unit}", f"≤ {limit:g} {unit}", ("met" if met else "**not met**") + f" ({margin})", why])

    def at_least(self, what: str, value: float | None, limit: float, unit: str, why: str = "") -> None:
        if value is None:
            self.rows.append([what, "not measured", f"≥ {limit:g}{unit}", "—", why])
            return
        met = value >= limit
        margin = f"{value / limit:.2f}× the target" if limit else ""
        self.rows.append([what, f"{value:.2f}{unit}", f"≥ {limit:g}{unit}", ("met" if met else "**not met**") + f" ({margin})", why])

    def flag(self, what: str, ok: bool | None, measured: str, target: str, why: str = "") -> None:
        verdict = "—" if ok is None else ("met" if ok else "**not met**")
        self.rows.append([what, measured, target, verdict, why])

    def render(self) -> str:
        return table(["target", "measured", "target value", "verdict", "note"], self.rows)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def search_steps(throughput: dict) -> str:
    """A path's throughput search, compact: `screens 10012✗×2 6007✓ · hold 6007✓`."""

    def step(run: dict) -> str:
        retried = run.get("retried")
        mark = ("✗✓" if retried else "✓") if run["held"] else ("✗×2" if retried else "✗")
        return f"{run['rate_asked']}{mark}"

    screens = " ".join(step(run) for run in throughput.get("screens", []))
    holds = " ".join(step(run) for run in throughput.get("holds", []))
    return f"screens {screens}" + (f" · hold {holds}" if holds else "")


def write(results: dict, output: Path) -> None:
    # The machine and commit as they were when the run started; a re-render keeps them.
    host = results.get("host") or machine()
    s = results["settings"]
    load = other_load(results)
    load_text = "unknown" if load is None else f"{load:.2f} CPU cores on average"
    steal = stolen(results)
    steal_text = "not recorded" if steal is None else f"{steal:.2f} CPU cores on average"
    quiet = load is not None and load <= 0.25 and (steal is None or steal <= 0.1)
    sections, verdicts = [], Verdicts()
    paths_run = [k for k in LABELS if k in (results.get("probe") or {})]

    latency = results.get("latency") or {}
    for rate, block in latency.items():
        rows = []
        for key in LABELS:
            p = block["paths"].get(key)
            if not p:
                if key in block.get("skipped", []):
                    rows.append([LABELS[key], "—", "—", "—", "—", "—", "not sent: its ceiling is below 1.25× this rate"])
                continue
            rows.append([
                LABELS[key], us(p["p50"]), us(p["p99"]), us(p.get("added_p50"), True), us(p.get("added_p99"), True),
                f"{p['cpu_us_per_request']:.0f}" if p.get("cpu_us_per_request") else "—",
                pct(p["success_min"], p["all_ok"]),
            ])
        sections.append(
            f"### Added latency at {rate} req/s\n\nMedians of {s['rounds']} rounds ({s['duration']} s each, "
            f"{s['connections']} connections, open loop); added = path − direct in the same round.\n\n"
            + table(["path", "p50 µs", "p99 µs", "added p50 µs", "added p99 µs", "CPU µs/request", "success (worst round)"], rows)
        )

    probe = results.get("probe") or {}
    throughput = results.get("throughput") or {}
    if throughput:
        rows = []
        for key in LABELS:
            t = throughput.get(key)
            if not t:
                continue
            hold = t["hold"]
            held = f"{t['held_rate']}" if t["held_rate"] else f"none (last try {hold['rate_asked']}: p99 {hold['p99'] / 1000:.1f} ms, {pct(hold['success'], hold['all_ok'])})"
            rows.append([LABELS[key], f"{probe.get(key, {}).get('median') or t['ceiling']:.0f}", held,
                         us(hold["p99"]) if t["held_rate"] else "—", search_steps(t)])
        sections.append(
            f"### Throughput\n\nUnthrottled: median of {s['rounds']} closed-loop runs ({s['probe']} s, {s['probe_connections']} "
            f"connections). Held: the highest rate tried that kept 100 % success and p99 < {s['p99_limit_ms']} ms for "
            f"{s['hold']} s (open loop, {s['probe_connections']} connections), found by {s['screen']} s screens from 90 % of "
            "the unthrottled rate: 40 % steps down until one holds, then halving the gap to the lowest that failed; a screen "
            "that fails is tried once more (one scheduling stall on two shared cores fails a 5 s screen), and the paths' "
            "searches advance together, one step of each in turn. *Search*: each screen's rate, ✓ held, ✗ failed, "
            "✗✓ held when tried again, ✗×2 failed twice; then each hold.\n\n"
            + table(["path", "unthrottled req/s", "held req/s", "p99 µs while held", "search"], rows)
        )

    streams = results.get("streams") or {}
    if streams:
        rows = []
        for level, block in streams.items():
            for key, p in block["paths"].items():
                rows.append([
                    level, LABELS[key], us(p["ttfb_p50"]), us(p.get("added_ttfb_p50"), True), us(p["delay_p50"]),
                    us(p["delay_p99"]), us(p.get("added_delay_p50"), True), us(p.get("added_delay_p99"), True),
                    p["held_back"], f"{p['streams'] - p['failed']}/{p['streams']}", p["events_per_stream"],
                ])
        sections.append(
            f"### Streaming\n\n{s['stream_chunks']} SSE events {s['stream_chunk_ms']} ms apart per stream (plus `[DONE]`); at level 1, "
            f"{s['single_streams']} streams one after another, otherwise that many at once; medians of {s['rounds']} rounds. "
            "The mock stamps each event with its send time (`x-mock-stamp`), so *delay* is each event's arrival − send, "
            "*added* is the path's percentile − direct's in the same round, and *held back* counts events that arrived only "
            "after the next one was sent (coalescing or buffering; 0 = every event went through on its own).\n\n"
            + table(["streams", "path", "TTFB p50 µs", "added TTFB p50 µs", "delay p50 µs", "delay p99 µs",
                     "added delay p50 µs", "added delay p99 µs", "held back", "complete", "events/stream"], rows)
        )

    memory = results.get("memory") or {}
    if memory:
        rows = []
        for name, m in memory.items():
            per_1000 = (m["peak_kb"] - m["baseline_kb"]) * 1000 / m["streams"]
            rows.append([name, mib(m["idle_start_kb"]), mib(m["baseline_kb"]), mib(m["peak_kb"]), mib(per_1000),
                         mib(m["after_kb"]), f"{100 * (m['after_kb'] / m['baseline_kb'] - 1):+.1f} %",
                         f"{m['complete']}/{m['streams']}"])
        minimal = results.get("memory_minimal")
        if minimal:
            rows.append(["sluice-minimal (one passthrough route)", mib(minimal["idle_kb"]), "—", "—", "—",
                         mib(minimal["after_requests_kb"]) + " after 1 s of requests", "—", "—"])
        sections.append(
            "### Memory\n\nRSS (`VmRSS`) of each Sluice: at start-up before any request (idle); just before "
            f"{memory[next(iter(memory))]['streams']} streams open at once (64 events 50 ms apart), the highest while "
            "they are open (sampled every 20 ms), and 2 s after they end. `sluice-full` is the full chain with tracing on; "
            "`sluice-lean` serves passthrough and the untraced full chain.\n\n"
            + table(["Sluice", "idle MiB", "before MiB", "open streams MiB", "per 1000 streams MiB", "after MiB",
                     "after vs before", "streams complete"], rows)
        )

    scaling = results.get("scaling") or {}
    if scaling:
        runs = scaling["runs"]["paths"]
        rows = []
        ladder = dict(LADDER)
        for key, p in runs.items():
            if key.startswith("tenants-"):
                label = f"{int(key.split('-')[1]):,} tenants, full chain"
            elif key.startswith("keys-"):
                label = f"{int(key.split('-')[1]):,} provider keys, full chain"
            elif key == "ladder-tracing":
                label = "ladder: + tracing (OTLP, every request)"
            else:
                label = "ladder: " + ladder[key.removeprefix("ladder-")]
            rows.append([label, f"{p['cpu_us_per_request']:.1f}" if p.get("cpu_us_per_request") else "—", us(p["p50"]),
                         us(p["p99"]), pct(p["success_min"], p["all_ok"])])
        instances = scaling["instances"]
        start_rows = [[f"{int(k):,}", f"{v['startup_s']:.2f}", mib(v["idle_rss_kb"])] for k, v in instances.items()]
        reload = scaling["reload"]
        reload_text = (
            f"Reloads at {reload['tenants']:,} tenants (each adds one tenant, so each is applied, not `unchanged`), "
            f"under {s['reload_rate']} req/s of full-chain traffic: "
            + ", ".join(f"{t * 1000:.0f} ms" for t in reload["times_s"])
            + f"; requests during them: {reload['load']['total']}, failed {reload['load']['total'] - reload['load']['ok']}, "
            f"p99 {reload['load']['p99']:.0f} µs."
        )
        sections.append(
            f"### Scaling\n\nEach configuration at {s['scaling_rate']} req/s for {s['scaling_duration']} s, once per round, "
            f"{s['rounds']} rounds (medians); tracing off except the last ladder step. CPU per request = Sluice's CPU time "
            "over the run (scheduler run time of all its threads, ns resolution) ÷ requests; it includes Sluice's background "
            "work in that time, such as span export.\n\n"
            + table(["configuration", "CPU µs/request", "p50 µs", "p99 µs", "success"], rows)
            + "\n\nStart-up (process start → `/readyz`) and idle RSS by tenant count:\n\n"
            + table(["tenants", "start-up s", "idle RSS MiB"], start_rows)
            + "\n\n" + reload_text
        )

    def held(key: str) -> float | None:
        """A path's highest rate held in the throughput phase."""
        return ((throughput or {}).get(key) or {}).get("held_rate")

    # -- verdicts --
    top_rate = str(max(int(r) for r in latency)) if latency else None
    if top_rate:
        full = latency[top_rate]["paths"].get("full", {})
        nginx = latency[top_rate]["paths"].get("nginx", {})
        verdicts.at_most(f"full chain added p50 at {top_rate} req/s", full.get("added_p50"), 100, "µs")
        verdicts.at_most(f"full chain added p99 at {top_rate} req/s", full.get("added_p99"), 500, "µs")
        for q in ("p50", "p99"):
            what = f"full chain added {q} ÷ nginx's at {top_rate} req/s"
            nginx_added = nginx.get(f"added_{q}")
            if nginx_added is not None and nginx_added <= 0:
                verdicts.flag(what, None, f"nginx added {nginx_added:+.0f} µs", "≤ 1.5×",
                              "not judged: nginx's added figure is not above zero (noise at this percentile)")
                continue
            verdicts.at_most(what, ratio(full.get(f"added_{q}"), nginx_added), 1.5, "×")
        for rate, block in latency.items():
            hit, direct = block["paths"].get("hit", {}), block["paths"].get("direct", {})
            if hit.get("p50") is not None and direct.get("p50") is not None:
                verdicts.at_most(f"cache hit p50 − direct p50 at {rate} req/s", hit["p50"] - direct["p50"], 0, "µs")
    if throughput:
        full_held = held("full")
        verdicts.at_least("full chain held throughput ÷ nginx's", ratio(full_held, held("nginx")), 0.7, "×")
        for peer, factor in (("litellm", 10), ("portkey", 3)):
            peer_rate = held(peer) or (probe.get(peer) or {}).get("median")
            why = "" if held(peer) else ("peer not run" if peer not in throughput else "peer held no rate: its unthrottled rate used")
            verdicts.at_least(f"full chain throughput ÷ {peer}'s", ratio(full_held, peer_rate), factor, "×", why)
        verdicts.at_least("cache hit held throughput ÷ miss (full chain)", ratio(held("hit"), full_held), 1.5, "×")
    if streams:
        top = str(max(int(k) for k in streams))
        full = streams[top]["paths"].get("full", {})
        verdicts.at_most(f"full chain added per-event delay p99 at {top} streams", full.get("added_delay_p99"), 1000, "µs")
        held_back = sum(b["paths"].get("full", {}).get("held_back", 0) for b in streams.values())
        complete = all(b["paths"].get("full", {}).get("failed", 0) == 0 for b in streams.values())
        verdicts.flag("no coalescing (full chain, every level)", held_back == 0, f"{held_back} events held back", "0",
                      "" if complete else "some streams failed: see the table")
    if memory:
        m = memory["sluice-full"]
        minimal = results.get("memory_minimal")
        if minimal:
            verdicts.at_most("idle RSS, least policy (one passthrough route)", minimal["idle_kb"] / 1024, 30, "MiB")
        verdicts.at_most("idle RSS, full-chain policy (tracing on, token limits)", m["idle_start_kb"] / 1024, 30, "MiB",
                         "tokenizer tables are mapped from the binary, not loaded; tracing and token limits cost about 5 MiB")
        verdicts.at_most("RSS per 1,000 open streams", (m["peak_kb"] - m["baseline_kb"]) * 1000 / m["streams"] / 1024, 32, "MiB")
        verdicts.at_most("RSS after the streams end vs before", 100 * (m["after_kb"] / m["baseline_kb"] - 1), 10, "%")
    if scaling:
        runs = scaling["runs"]["paths"]
        tenant_keys = sorted((k for k in runs if k.startswith("tenants-")), key=lambda k: int(k.split("-")[1]))
        low, high = runs[tenant_keys[0]].get("cpu_us_per_request"), runs[tenant_keys[-1]].get("cpu_us_per_request")
        if low and high:
            verdicts.at_most(
                f"CPU per request growth, {tenant_keys[0].split('-')[1]} → {int(tenant_keys[-1].split('-')[1]):,} tenants",
                100 * (high / low - 1), 5, "%",
            )
        most_tenants = max(int(k.split("-")[1]) for k in tenant_keys)
        verdicts.flag(
            "a policy with 100,000 tenants", most_tenants >= 100_000,
            f"loads and serves {most_tenants:,}" if most_tenants >= 100_000 else f"not run (largest {most_tenants:,})",
            "loads and serves",
        )
        reload = scaling["reload"]
        verdicts.at_most(f"reload time at {reload['tenants']:,} tenants (slowest)", max(reload["times_s"]) * 1000, 1000, "ms")
        failed = reload["load"]["total"] - reload["load"]["ok"]
        verdicts.flag("no failed request during reloads", failed == 0, f"{failed} failed of {reload['load']['total']}", "0")

    # -- telemetry cost (issue 7) --
    telemetry = []
    for rate, block in latency.items():
        on, off = block["paths"].get("full"), block["paths"].get("full-notrace")
        if on and off:
            cpu = ""
            if on.get("cpu_us_per_request") and off.get("cpu_us_per_request"):
                cpu = f", CPU {on['cpu_us_per_request'] - off['cpu_us_per_request']:+.0f} µs per request"
            telemetry.append(
                f"- At {rate} req/s, tracing on − off: p50 {on['p50'] - off['p50']:+.0f} µs, p99 {on['p99'] - off['p99']:+.0f} µs{cpu}."
            )
    # -- the framework floor: what Pingora itself costs, and what Sluice adds on top of it --
    floor_lines = []
    for rate, block in latency.items():
        paths = block["paths"]
        floor, nginx, passthrough = paths.get("floor"), paths.get("nginx"), paths.get("pass")
        if floor and nginx and passthrough:
            floor_lines.append(
                f"- At {rate} req/s, added p50: nginx {us(nginx.get('added_p50'), True)} µs, Pingora floor "
                f"{us(floor.get('added_p50'), True)} µs, Sluice passthrough {us(passthrough.get('added_p50'), True)} µs; "
                f"Sluice over the floor p50 {us(passthrough['p50'] - floor['p50'], True)} µs, "
                f"p99 {us(passthrough['p99'] - floor['p99'], True)} µs."
            )
    if held("floor"):
        floor_held = held("floor")
        parts = [f"{LABELS[k]} {ratio(held(k), floor_held):.2f}×" for k in ("nginx", "pass", "full", "full-notrace")
                 if held(k)]
        floor_lines.append(f"- Held throughput relative to the Pingora floor ({floor_held:.0f} req/s): {', '.join(parts)}.")

    sink = results.get("otlp_sink") or {}
    if sink:
        telemetry.append(f"- The local collector received {sink.get('requests', 0)} OTLP exports ({sink.get('bytes', 0) / 1e6:.1f} MB) during the run.")

    peers = results.get("peers") or {}
    peer_lines = []
    for name, label in (("litellm", "LiteLLM proxy (PyPI `litellm[proxy]`)"), ("portkey", "Portkey gateway (npm `@portkey-ai/gateway`)")):
        info = peers.get(name)
        if info is None:
            peer_lines.append(f"- {label}: not run (`BENCH_PEERS=0`).")
        elif info.get("available"):
            peer_lines.append(f"- {label} {info['version']}: run against the same mock.")
        else:
            peer_lines.append(f"- {label}: **not measured** — {info.get('why', 'unavailable')}.")

    busy = "" if quiet else " — **the machine was not quiet: time figures are skewed by that load**"
    text = f"""# Benchmarks

Produced by `make bench` (`python3 bench/suite.py`), which overwrites this file: figures from one run,
{results['wall_s'] / 60:.1f} minutes. Compare paths within the run; absolute numbers move with the machine and its load.
Raw results of the last run: `bench-out/last/results.json` (re-render with `python3 bench/report.py`).

## Method

- **Builds**: every Rust binary of the run (Sluice, the mock, the floor, the stream client) in the `{s['profile']}`
  profile{' (fat LTO, one codegen unit: what the container image ships)' if s['profile'] == 'production' else ''};
  every process started without `SSL_CERT_FILE`/`SSL_CERT_DIR`, as in the image.
- **Upstream**: `sluice-mock` (zero delay, `--no-record`, `TCP_NODELAY` as providers' front ends set it), a small non-streaming chat
  completion for the fixed-rate and throughput runs; SSE streams with send stamps for the streaming runs.
- **Paths**, all in this one run against the same mock: {', '.join(LABELS[k] for k in paths_run) or 'see below'}.
  - nginx {host['nginx']}: 2 workers, upstream keepalive, HTTP/1.1 upstream, no access log, no buffering.
  - Pingora floor (`bench/floor`): Pingora 0.9's own proxy with nothing on it — one upstream over Pingora's pooled
    connector, a path prefix removed, 2 threads, the same allocator (jemalloc) as Sluice. Sluice passthrough − floor is what
    Sluice itself adds; floor − nginx is the framework's (Pingora and tokio) cost.
  - Sluice passthrough: route `/pass`, no Sluice key, no filters, no tracing.
  - Sluice full chain: auth (a Sluice key, tenant lookup), limits (GCRA rate, daily requests, daily tokens with a
    prompt estimate, concurrency, monthly budget priced per model — all checked and charged, never refusing), the
    response cache (`Cache-Control: no-cache` on every request: no lookup, a miss that goes upstream and is stored),
    key rotation (2 weighted provider keys), a fallback target configured, latency recording (metrics, rolling
    stats), and with *tracing on* every request sampled and exported over OTLP http/protobuf to a local collector
    that accepts and discards (`bench/otlp_sink.py`); *tracing off* is the same chain in a Sluice with no OTLP.
    Policies: `bench/policies.py`; `server.threads: 2`; log level `warn`.
  - Sluice cache hit: the full chain without `no-cache`: every request is answered from the cache.
{chr(10).join(peer_lines)}
- **Load**: {results.get('tools', {}).get('oha', 'oha')}, HTTP/1.1 keep-alive, `POST` with the body
  `{s.get('body', '')}`. Fixed rates are open loop (`-q` with `--latency-correction`: latency counts from when each
  request was due, so a stall is not hidden); in-flight requests are awaited at the end (`-w`).
- **Rounds**: every phase runs its paths one after another within a round, and rounds repeat
  (A B C … A B C …), so slow drifts of the machine hit every path alike; figures are medians over rounds.
- **Success** is an HTTP 200; anything else (other statuses, connection errors, timeouts) is a failure.
- **Shared machine**: the load generator, the mock, the collector and the servers share {host['cpus']} cores over
  loopback, so they compete for CPU: rates are bounded by that shared CPU, not by one server alone.

## Machine

- CPU: {host['cpus']} × {host['cpu']}; memory {host['memory']}
- Kernel: {host['kernel']}; toolchain: {host['rustc']}
- Run: {host['date']}, commit `{host['commit']}`
- Load from other processes during the measurements: {load_text} (CPU time outside the bench's own process
  tree; 0 means the machine was otherwise quiet)
- Taken by the host from this virtual machine during the measurements (steal): {steal_text}{busy}

## Targets (issue 9)

{verdicts.render()}

## Figures

{(chr(10) * 2).join(sections)}

### Cost of telemetry (issue 7)

{chr(10).join(telemetry) or '- not measured in this run'}

### The framework floor

A bare Pingora proxy (`bench/floor`) on the same mock: the floor − nginx distance is Pingora's and tokio's own cost
on this machine, which Sluice cannot go below while it runs on them; Sluice passthrough − floor is Sluice's own.

{chr(10).join(floor_lines) or '- not measured in this run'}
"""
    notes = Path(__file__).resolve().parent / "NOTES.md"
    if notes.exists() and not results["settings"].get("smoke"):
        text += "\n" + notes.read_text()
    output.write_text(text)


def main() -> None:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    results = json.loads(Path(sys.argv[1]).read_text())
    write(results, Path(sys.argv[2] if len(sys.argv) == 3 else "BENCHMARKS.md"))


if __name__ == "__main__":
    main()
