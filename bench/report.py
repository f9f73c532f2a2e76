"""Turns the oha results of bench/run.sh into a table on stdout and BENCHMARKS.md."""

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

PATHS = ("direct", "sluice", "nginx")


def load(work: Path, name: str) -> dict:
    data = json.loads((work / f"{name}.json").read_text())
    summary = data["summary"]
    percentiles = data.get("latencyPercentiles") or data.get("latency_percentiles") or {}
    codes = data.get("statusCodeDistribution", {})
    # Requests still in flight when the run's time is up are not failures.
    errors = {k: v for k, v in data.get("errorDistribution", {}).items() if "deadline" not in k}
    total = sum(codes.values()) + sum(errors.values())
    ok = codes.get("200", 0)
    return {
        "p50_us": percentiles["p50"] * 1e6,
        "p99_us": percentiles["p99"] * 1e6,
        "rps": summary["requestsPerSec"],
        "success": 100.0 * ok / total if total else 0.0,
        "requests": total,
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
    }


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--rate", required=True)
    parser.add_argument("--duration", required=True)
    parser.add_argument("--connections", required=True)
    parser.add_argument("--max-connections", required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    fixed = {p: load(args.work, f"{p}-fixed") for p in PATHS}
    peak = {p: load(args.work, f"{p}-max") for p in PATHS}
    memory = (args.work / "sluice-memory.txt").read_text().strip().replace("\n", ", ")
    host = machine()

    added = {
        p: (fixed[p]["p50_us"] - fixed["direct"]["p50_us"], fixed[p]["p99_us"] - fixed["direct"]["p99_us"])
        for p in ("sluice", "nginx")
    }
    rows = []
    for p in PATHS:
        a50, a99 = added.get(p, (0.0, 0.0))
        rows.append(
            f"| {p} | {fixed[p]['p50_us']:.0f} | {fixed[p]['p99_us']:.0f} | "
            + (f"{a50:+.0f} | {a99:+.0f} | " if p != "direct" else "— | — | ")
            + f"{fixed[p]['success']:.2f} % | {peak[p]['rps']:.0f} | {peak[p]['success']:.2f} % |"
        )
    s50, s99 = added["sluice"]
    n50, n99 = added["nginx"]
    table = "\n".join(
        [
            f"| path | p50 µs at {args.rate}/s | p99 µs at {args.rate}/s | added p50 µs | added p99 µs | success | max req/s | success at max |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    summary = "\n".join(
        [
            f"- Sluice adds {s50:.0f} µs at p50 and {s99:.0f} µs at p99 over the direct path; "
            f"nginx adds {n50:.0f} µs and {n99:.0f} µs (Sluice/nginx: {ratio(s50, n50)} at p50, {ratio(s99, n99)} at p99).",
            f"- Highest rate unthrottled with {args.max_connections} connections: Sluice {peak['sluice']['rps']:.0f} req/s, "
            f"nginx {peak['nginx']['rps']:.0f} req/s, direct {peak['direct']['rps']:.0f} req/s "
            f"(Sluice/nginx: {ratio(peak['sluice']['rps'], peak['nginx']['rps'])}).",
            f"- Sluice memory after the run: {memory}.",
        ]
    )
    print(table)
    print()
    print(summary)

    args.output.write_text(
        f"""# Benchmarks

Produced by `make bench` (`bench/run.sh`); rerun it to refresh this file. Figures from one run.

## Method

- **Upstream**: `sluice-mock` (release build, zero delay, recording off) answering
  `POST /v1/chat/completions` with a small non-streaming completion.
- **Three paths, one run**: direct to the mock; through Sluice (release build, 2 worker threads,
  policy `bench/policy.yaml.tmpl`: one route, default filters); through nginx (2 workers, upstream
  keepalive, no access log, `bench/nginx.conf.tmpl`) as the reference proxy.
- **Load**: [oha](https://crates.io/crates/oha), HTTP/1.1 keep-alive, body
  `{args.body}`.
  1. warm-up: 2 s, {args.connections} connections;
  2. latency at a fixed rate: {args.rate} req/s for {args.duration}, {args.connections} connections — p50/p99,
     with oha's latency correction (no coordinated omission);
  3. highest rate: unthrottled for {args.duration}, {args.max_connections} connections — requests/s and success.
- **Added latency** is the path's percentile minus the direct path's, measured in the same run.
- Sluice reads each request body whole and drives the upstream exchange itself (see DESIGN.md),
  which nginx does not; nginx is the floor a proxy can reach, not a like-for-like gateway.
- The load generator, the mock and the proxy share the machine's {host['cpus']} cores, so absolute
  figures are noisy and throughput is bounded by the shared CPU; compare paths within one run.

## Machine

- {host['cpus']} CPUs: {host['cpu']}
- Linux {host['kernel']}
- {host['date']}, commit `{host['commit']}`

## Figures

{table}

{summary}
"""
    )


if __name__ == "__main__":
    main()
