"""Reads the load generator's results of bench/run.sh; prints the figures and writes BENCHMARKS.md.

    report.py check RESULT.json    exit 0 if every request of that run succeeded, 3 if not
    report.py cpu PID              CPU seconds used so far by the machine and by PID's tree (JSON)
    report.py write WORK [options] print the tables, write the markdown file (--output)

Results are oha's JSON (`--output-format json`) or, with the wrk fallback, the JSON written by
bench/wrk.lua. Standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PATHS = ("direct", "sluice", "nginx", "cache-hit", "cache-miss")
LABELS = {
    "direct": "direct to the mock",
    "sluice": "through Sluice",
    "nginx": "through nginx",
    "cache-hit": "Sluice, cache hit",
    "cache-miss": "Sluice, cache miss (no-cache)",
}


def load(path: Path) -> dict:
    """One run's figures: requests, successes (HTTP 200), duration, latency percentiles in µs."""
    data = json.loads(path.read_text())
    if data.get("tool") == "wrk":
        total = data["requests"] + data["socket_errors"]
        ok = data["requests"] - data["non_2xx"]
        seconds = data["seconds"]
        p50, p99 = data["p50_us"], data["p99_us"]
        errors = {"non-2xx": data["non_2xx"], "socket errors": data["socket_errors"]}
    else:  # oha
        codes = data.get("statusCodeDistribution") or {}
        # Requests cut off by the end of the run are not failures (run.sh waits for them with
        # -w anyway, so there should be none).
        errors = {k: v for k, v in (data.get("errorDistribution") or {}).items() if "deadline" not in k}
        ok = codes.get("200", 0)
        total = sum(codes.values()) + sum(errors.values())
        errors.update({f"HTTP {code}": n for code, n in codes.items() if code != "200"})
        seconds = data["summary"]["total"]
        percentiles = data.get("latencyPercentiles") or {}
        p50 = (percentiles.get("p50") or 0.0) * 1e6
        p99 = (percentiles.get("p99") or 0.0) * 1e6
    return {
        "total": total,
        "ok": ok,
        "success": 100.0 * ok / total if total else 0.0,
        "all_ok": total > 0 and ok == total,
        "rate": total / seconds if seconds else 0.0,  # requests sent per second
        "ok_rate": ok / seconds if seconds else 0.0,  # successful requests per second
        "p50": p50,
        "p99": p99,
        "errors": {k: v for k, v in errors.items() if v},
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

    cpus = run("nproc") or "?"
    mem = first("/proc/meminfo", "MemTotal")
    mem_gib = f"{int(mem.split()[0]) / 1024 / 1024:.0f} GiB" if mem[:1].isdigit() else "unknown"
    commit = run("git", "rev-parse", "--short", "HEAD")
    if not commit or " " in commit:
        commit = "unknown"
    elif run("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "cpus": cpus,
        "cpu": first("/proc/cpuinfo", "model name"),
        "memory": mem_gib,
        "kernel": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "rustc": run("rustc", "--version") or "unknown",
        "nginx": run("nginx", "-v").replace("nginx version: ", "") or "unknown",
    }


def cpu_snapshot(root: int) -> dict:
    """CPU seconds used so far by the whole machine and by ROOT (the bench script), its children
    that ended and all its live descendants (servers, nginx workers, the load generator)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    stats, children = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid, ppid = int(entry.name), int(rest[1])
        stats[pid] = [int(x) for x in rest[11:15]]  # utime stime cutime cstime
        children.setdefault(ppid, []).append(pid)
    ours, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            ours += sum(stats[pid])  # own time and that of its children already reaped
            todo += children.get(pid, [])
    with open("/proc/uptime") as uptime:
        wall = float(uptime.read().split()[0])
    return {"wall": wall, "busy": (user + nice + system + irq + softirq) / tick, "ours": ours / tick}


def other_cpu(work: Path) -> tuple:
    """Average CPU cores used by processes outside the bench between the two snapshots, and how
    that reads in the report."""
    try:
        start = json.loads((work / "cpu-start.json").read_text())
        end = json.loads((work / "cpu-end.json").read_text())
        wall = end["wall"] - start["wall"]
        cores = max((end["busy"] - start["busy"]) - (end["ours"] - start["ours"]), 0.0) / wall
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return None, "an unknown share of the CPU"
    return cores, f"{cores:.2f} CPU cores on average"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference > 0 else "n/a"


def pct(run: dict) -> str:
    text = f"{run['success']:.2f} %"
    if not run["all_ok"] and text == "100.00 %":
        text = "99.99+ %"  # never round a failure away
    return text


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write(args: argparse.Namespace) -> None:
    work = args.work
    fixed = {p: load(work / f"{p}-fixed.json") for p in PATHS}
    peak = {p: load(work / f"{p}-max.json") for p in PATHS}
    step = {p: load(work / f"{p}-step.json") for p in PATHS if (work / f"{p}-step.json").exists()}
    memory = json.loads((work / "sluice-memory.json").read_text())
    host = machine()
    other_cores, other = other_cpu(work)
    busy_note = ""
    if other_cores is not None and other_cores > 0.25:
        busy_note = " — **the machine was not quiet: these figures are skewed; rerun on a quiet machine**"

    direct = fixed["direct"]
    added = {p: (fixed[p]["p50"] - direct["p50"], fixed[p]["p99"] - direct["p99"]) for p in PATHS if p != "direct"}

    latency_rows = []
    for p in PATHS:
        f = fixed[p]
        a50, a99 = (f"{added[p][0]:+.0f}", f"{added[p][1]:+.0f}") if p in added else ("—", "—")
        latency_rows.append([LABELS[p], f"{f['rate']:.0f}", f"{f['p50']:.0f}", f"{f['p99']:.0f}", a50, a99, pct(f)])
    latency = table(
        ["path", "sent req/s", "p50 µs", "p99 µs", "added p50 µs", "added p99 µs", "success"], latency_rows
    )

    throughput_rows = []
    for p in PATHS:
        m = peak[p]
        s = step.get(p)
        stepped = (f"{s['ok_rate']:.0f} req/s, {pct(s)}") if s else "— (not needed)"
        throughput_rows.append([LABELS[p], f"{m['ok_rate']:.0f}", pct(m), stepped])
    throughput = table(
        ["path", f"req/s at {args.max_connections} conn.", "success", f"stepped down to {args.step_connections} conn."],
        throughput_rows,
    )

    s50, s99 = added["sluice"]
    n50, n99 = added["nginx"]
    s_rps, n_rps, d_rps = peak["sluice"]["ok_rate"], peak["nginx"]["ok_rate"], peak["direct"]["ok_rate"]
    findings = [
        f"- **Added latency** at {args.rate} req/s: Sluice {s50:+.0f} µs p50 / {s99:+.0f} µs p99; "
        f"nginx {n50:+.0f} µs p50 / {n99:+.0f} µs p99. "
        f"Sluice ÷ nginx: {ratio(s50, n50)} at p50, {ratio(s99, n99)} at p99"
        + (" (n/a: nginx's added latency is not above zero, i.e. within the noise)." if min(n50, n99) <= 0 else "."),
        f"- **Throughput** unthrottled with {args.max_connections} connections: Sluice {s_rps:.0f} req/s, "
        f"nginx {n_rps:.0f} req/s, direct {d_rps:.0f} req/s. Sluice ÷ nginx: {ratio(s_rps, n_rps)}.",
        f"- **Cache**: a hit is answered in {fixed['cache-hit']['p50']:.0f} µs p50 / {fixed['cache-hit']['p99']:.0f} µs p99 "
        f"at {args.rate} req/s, against {direct['p50']:.0f} / {direct['p99']:.0f} µs for the direct path to the "
        f"zero-delay mock and {fixed['cache-miss']['p50']:.0f} / {fixed['cache-miss']['p99']:.0f} µs for a miss "
        f"(upstream call plus recording and storing). Unthrottled: hits {peak['cache-hit']['ok_rate']:.0f} req/s, "
        f"misses {peak['cache-miss']['ok_rate']:.0f} req/s (hit ÷ miss {ratio(peak['cache-hit']['ok_rate'], peak['cache-miss']['ok_rate'])}), "
        f"uncached route {s_rps:.0f} req/s.",
        f"- **Sluice memory**: peak RSS (VmHWM) {memory['hwm_kb'] / 1024:.1f} MiB after the run "
        f"(RSS {memory['idle_kb'] / 1024:.1f} MiB when idle before it).",
    ]
    failures = [
        f"  - {LABELS[p]} ({phase}): " + ", ".join(f"{k}: {v}" for k, v in r["errors"].items())
        for phase, runs in (("fixed rate", fixed), ("unthrottled", peak), ("stepped down", step))
        for p, r in runs.items()
        if r["errors"]
    ]
    if failures:
        findings += ["- Failed requests:", *failures]

    figures = f"""Latency at a fixed rate of {args.rate} req/s ({args.connections} connections, {args.duration} s):

{latency}

Highest rate, unthrottled ({args.duration} s):

{throughput}

{chr(10).join(findings)}"""
    print(figures)
    print(f"\nOther processes used {other} during the measurements{busy_note}.")

    if args.tool == "oha":
        load_text = (
            f"[oha](https://crates.io/crates/oha) {args.tool_version.removeprefix('oha ')}, HTTP/1.1 keep-alive;\n"
            "  the fixed-rate run uses `-q` with `--latency-correction`, so latency is measured from when\n"
            "  each request was due (no coordinated omission); in-flight requests are awaited at the end (`-w`)"
        )
    else:
        load_text = (
            f"wrk ({args.tool_version}, the fallback: oha was not available), 2 threads, HTTP/1.1\n"
            "  keep-alive; wrk has no rate limit, so the fixed rate is approximated by pacing each\n"
            "  connection (`bench/wrk.lua`) and its latency does not correct for coordinated omission"
        )

    args.output.write_text(
        f"""# Benchmarks

Produced by `make bench` (`bash bench/run.sh`), which overwrites this file: figures from one run.
Compare the paths within a run; absolute numbers move from run to run and machine to machine.

## Method

- **Upstream**: `sluice-mock` (release build, zero delay, `--no-record`) answering
  `POST /v1/chat/completions` with a small non-streaming JSON completion.
- **Five paths**, measured one after the other in the same run, against the same mock process:
  1. direct to the mock;
  2. through Sluice (release build, `server.threads: 2`, one route and no filters beyond the
     defaults: `bench/policy.yaml.tmpl`, log level `warn`);
  3. through nginx {host['nginx'].removeprefix('nginx/')} as the reference reverse proxy
     (`bench/nginx.conf.tmpl`: 2 workers, upstream keepalive 64, HTTP/1.1 to the upstream,
     no access log, no response buffering);
  4. through Sluice's response cache, every request a hit (route `/cached`: `cache: {{ when:
     always }}`; the entry is stored by a first call before the measurements);
  5. the same route with `Cache-Control: no-cache` on every request: each one a miss that goes
     upstream and is recorded and stored (the entry replaced), the most a miss costs.
- **Load**: {load_text}. Every request is
  `POST` with `content-type: application/json` and the body
  `{args.body}`.
- **Each path**: {args.warmup} s warm-up ({args.connections} connections, unthrottled); then
  {args.rate} req/s for {args.duration} s over {args.connections} connections (p50, p99, success);
  then unthrottled for {args.duration} s over {args.max_connections} connections (successful
  requests per second, success). If that run is not 100 % successful, it is repeated once with
  {args.step_connections} connections and both are reported.
- **Success** is an HTTP 200; anything else (other statuses, connection errors, timeouts) is a failure.
- **Added latency** is a proxied path's percentile minus the direct path's in the same run; the
  ratios divide Sluice's figure by nginx's. A p99 out of {args.rate * args.duration} requests on a
  shared {host['cpus']}-core machine moves by a few hundred µs from run to run with scheduling: read small or
  negative differences there as noise.
- **Peak memory** is Sluice's `VmHWM` from `/proc/PID/status` after all five paths ran.
- **Not like for like**: Sluice reads each request body whole and drives the upstream exchange
  itself (route match, filters, upstream request, response filters chunk by chunk: see README.md,
  "How a request goes through"), while nginx only relays the bytes; nginx shows the least a
  proxy costs on this machine, not a gateway with the same work to do.
- **Shared machine**: the load generator, the mock and the proxy all run on the same
  {host['cpus']}-core machine over loopback, so they compete for CPU: absolute numbers are noisy
  and the unthrottled rates are bounded by that shared CPU rather than by any one server.

## Machine

- CPU: {host['cpus']} × {host['cpu']}; memory {host['memory']}
- Kernel: {host['kernel']}
- Toolchain: {host['rustc']}
- Run: {host['date']}, commit `{host['commit']}`
- Other processes on the machine used {other} during the measurements
  (CPU time outside the bench's own processes; 0 means the machine was otherwise quiet){busy_note}

## Figures

{figures}
"""
    )
    print(f"\nwrote {args.output}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cpu = commands.add_parser("cpu")
    cpu.add_argument("root", type=int)
    check = commands.add_parser("check")
    check.add_argument("result", type=Path)
    report = commands.add_parser("write")
    report.add_argument("work", type=Path)
    for option in ("rate", "warmup", "duration", "connections", "max-connections", "step-connections"):
        report.add_argument(f"--{option}", type=int, required=True)
    report.add_argument("--body", required=True)
    report.add_argument("--tool", choices=("oha", "wrk"), required=True)
    report.add_argument("--tool-version", default="")
    report.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    if args.command == "cpu":
        print(json.dumps(cpu_snapshot(args.root)))
        return
    if args.command == "check":
        result = load(args.result)
        print(f"{result['ok_rate']:.0f} req/s, {pct(result)} success", file=sys.stderr)
        sys.exit(0 if result["all_ok"] else 3)
    write(args)


if __name__ == "__main__":
    main()
