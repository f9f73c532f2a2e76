"""Instructions per request of Sluice's paths under callgrind: the figure that does not move with
the machine's load, for judging an optimisation of the hot path.

    python3 bench/profile.py [REQUESTS]        (default 2000; the production build
                                               `make bench` makes; about a minute)

Runs the mock and the two Sluices of `make bench` (`bench/policies.py`: one tracing to a local
collector, one not) under `valgrind --tool=callgrind`, sends REQUESTS sequential requests per
path after a warm-up, and reports Sluice's instructions per request (all threads, span export
included) for each: passthrough (tracing off and on), full chain with tracing off and on (cache miss), cache hit.
Valgrind's CPU has no SHA extensions, so SHA-256 (cache keys, caller keys) runs in software here
and costs more than natively. Counters are zeroed after the warm-up and
dumped after each path (`callgrind_control`), so start-up is not counted. The dumps stay in
bench-out/profile/ for `callgrind_annotate` (the top functions of each path are printed).

    python3 bench/profile.py [REQUESTS] --tenants 1,100000

profiles instead the untraced full chain of the bench's scaling Sluices (`sluice_scaling`, one
per tenant count, the caller being tenant 0 as in `make bench`): the stable form of the
scaling target's "CPU per request, 1 → 100,000 tenants", whose timed figure moves by ±10 %
between 5 s runs. A 100,000-tenant policy takes a minute or two to load under valgrind.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policies  # noqa: E402
from suite import ROOT, BenchError, Processes, Settings, Target, free_ports, http, wait_ready  # noqa: E402


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def send(target: Target, count: int) -> None:
    argv = ["oha", "--no-tui", "-n", str(count), "-c", "1", "-m", "POST", "-H", "content-type: application/json"]
    for header in target.headers:
        argv += ["-H", header]
    argv += ["-d", policies.CHAT_BODY, target.url]
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


def total_instructions(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise BenchError(f"no totals in {dump}")


def profile(processes: Processes, work: Path, paths: dict, count: int) -> dict:
    """Instructions per request of each of PATHS (key → (process name, target)), in turn."""
    figures = {}
    for key, (name, target) in paths.items():
        pid = processes.started[name].pid
        send(target, 200)  # warm-up: pools, caches, lazily built state
        time.sleep(1)
        callgrind_control("-z", str(pid))
        send(target, count)
        time.sleep(1)  # the exporter's batch for these requests is counted too
        callgrind_control("-d", key, str(pid))
        dump = max(work.glob(f"callgrind.out.{pid}.*"), key=lambda p: p.stat().st_mtime)
        named = work / f"callgrind.{key}"
        dump.rename(named)
        figures[key] = total_instructions(named) / count
        print(f"{key}: {figures[key]:,.0f} instructions per request", flush=True)
    return figures


def start_under_callgrind(processes: Processes, work: Path, binaries: Path, name: str, policy: dict) -> None:
    policies.write_policy(work / f"{name}.yaml", policy)
    processes.start(
        name,
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.out.%p",
         binaries / "sluice", "run", "-c", work / f"{name}.yaml"],
        {"SLUICE_LOG": "warn"},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requests", nargs="?", type=int, default=2000)
    parser.add_argument("--tenants", help="comma-separated tenant counts: profile the scaling Sluices instead")
    args = parser.parse_args()
    count = args.requests
    work = ROOT / "bench-out" / "profile"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    processes = Processes(work)
    binaries = ROOT / "target" / Settings().profile  # as `make bench` builds it (BENCH_PROFILE)
    mock, sink = free_ports(2)
    tenant = f"authorization: Bearer {policies.caller_key(0)}"
    chat = "/v1/chat/completions"
    try:
        processes.start("mock", [binaries / "sluice-mock", "--listen", f"127.0.0.1:{mock}", "--no-record"])
        wait_ready(processes, "mock", f"http://127.0.0.1:{mock}/_mock/health")
        admins = {}
        paths = {}
        if args.tenants:
            for tenants in (int(n) for n in args.tenants.split(",")):
                name = f"tenants-{tenants}"
                proxy, admin = free_ports(2)
                policy = policies.sluice_scaling(proxy, admin, mock, tenants, [1], work / f"{name}-keys.yaml")
                start_under_callgrind(processes, work, binaries, name, policy)
                admins[name] = admin
                paths[name] = (name, Target(name, f"http://127.0.0.1:{proxy}/full{chat}", [tenant, "cache-control: no-cache"]))
        else:
            processes.start("otlp-sink", [sys.executable, ROOT / "bench" / "otlp_sink.py", str(sink)])
            # As in `make bench`: the traced Sluice serves the full chain and the cache hit, the
            # lean one (no OTLP) passthrough and the untraced full chain.
            traced_proxy, traced_admin, lean_proxy, lean_admin = free_ports(4)
            start_under_callgrind(processes, work, binaries, "traced", policies.sluice_main(traced_proxy, traced_admin, mock, sink))
            start_under_callgrind(processes, work, binaries, "lean", policies.sluice_main(lean_proxy, lean_admin, mock, None))
            admins = {"traced": traced_admin, "lean": lean_admin}
            paths = {
                "pass": ("lean", Target("pass", f"http://127.0.0.1:{lean_proxy}/pass{chat}")),
                "pass-traced": ("traced", Target("pass-traced", f"http://127.0.0.1:{traced_proxy}/pass{chat}")),
                "full-notrace": ("lean", Target("full-notrace", f"http://127.0.0.1:{lean_proxy}/full{chat}", [tenant, "cache-control: no-cache"])),
                "full": ("traced", Target("full", f"http://127.0.0.1:{traced_proxy}/full{chat}", [tenant, "cache-control: no-cache"])),
                "hit": ("traced", Target("hit", f"http://127.0.0.1:{traced_proxy}/full{chat}", [tenant])),
            }
        for name, admin in admins.items():
            wait_ready(processes, name, f"http://127.0.0.1:{admin}/readyz", limit=600)
        figures = profile(processes, work, paths, count)
        for name, admin in admins.items():
            status, _, _ = http("GET", f"http://127.0.0.1:{admin}/readyz")
            if status != 200:
                raise BenchError(f"{name} is not ready after the profile")
    finally:
        processes.stop_all()
    for key in figures:
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(work / f"callgrind.{key}")],
            capture_output=True, text=True,
        ).stdout
        (work / f"annotate.{key}.txt").write_text(annotated)
        # Sluice's own functions, inclusive, per request: where the path's instructions go.
        rows = []
        for line in annotated.splitlines():
            found = re.match(r"\s*([\d,]+) \(.*?\)\s+(\S+?):(.*?) \[", line)
            if found and re.search(r"sluice(_filters)?::", found.group(3)) and "{{closure}}" not in found.group(3):
                rows.append(f"{int(found.group(1).replace(',', '')) / count:>10,.0f}  {found.group(3)[:110]}")
        print(f"\n{key}: Sluice's functions, inclusive instructions per request\n" + "\n".join(rows[:20]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
