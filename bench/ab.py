"""Two Sluice binaries side by side, same mock, same policy, rounds interleaved (A B A B …):
the quick way to tell whether a change to the request path helps, before a whole `make bench`.

    python3 bench/ab.py BINARY_A BINARY_B [--rate 2000] [--seconds 5] [--rounds 5] [--path full-notrace]

Paths (bench/policies.py's main policy): `pass` (no filters), `full-notrace` (the full chain,
cache miss, no tracing), `full` (the same with every request traced, spans exported to the
bench's local OTLP sink), `hit` (a cache hit). Per round and binary: a fixed-rate open-loop run
(p50, p99, CPU per request) and a closed-loop run (requests per second). Medians of rounds are
printed; times on a shared 2-core machine move by tens of microseconds, so read the medians
and run enough rounds. Optional: `--streams N` adds N concurrent SSE streams per round.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policies  # noqa: E402
import suite  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--path", default="full-notrace", choices=["pass", "full-notrace", "full", "hit"])
    parser.add_argument("--streams", type=int, default=0)
    parser.add_argument("--mock", default=str(policies.ROOT / "target" / "release" / "sluice-mock"))
    args = parser.parse_args()

    work = policies.ROOT / "bench-out" / "ab"
    (work / "runs").mkdir(parents=True, exist_ok=True)
    processes = suite.Processes(work)
    oha = suite.Oha(work)
    stream_bin = policies.ROOT / "target" / "release" / "sluice-stream-bench"
    try:
        mock = suite.free_ports(1)[0]
        processes.start("mock", [args.mock, "--listen", f"127.0.0.1:{mock}", "--no-record"])
        suite.wait_ready(processes, "mock", f"http://127.0.0.1:{mock}/_mock/health")
        otlp = None
        if args.path == "full":
            otlp = suite.free_ports(1)[0]
            processes.start("otlp-sink", [sys.executable, policies.ROOT / "bench" / "otlp_sink.py", str(otlp)])
            suite.wait_ready(processes, "otlp-sink", f"http://127.0.0.1:{otlp}/stats")
        targets = {}
        tenant = f"authorization: Bearer {policies.caller_key(0)}"
        miss = [tenant, "cache-control: no-cache"]
        headers = {"pass": [], "full-notrace": miss, "full": miss, "hit": [tenant]}[args.path]
        prefix = "/pass" if args.path == "pass" else "/full"
        for name, binary in (("A", args.a), ("B", args.b)):
            proxy, admin = suite.free_ports(2)
            policies.write_policy(work / f"{name}.yaml", policies.sluice_main(proxy, admin, mock, otlp))
            processes.start(name, [binary, "run", "-c", work / f"{name}.yaml"], {"SLUICE_LOG": "warn"})
            suite.wait_ready(processes, name, f"http://127.0.0.1:{admin}/readyz")
            pid = processes.started[name].pid
            targets[name] = suite.Target(name, f"http://127.0.0.1:{proxy}{prefix}/v1/chat/completions", headers, pid)
            targets[name + "-stream"] = suite.Target(name, f"http://127.0.0.1:{proxy}/pass/v1/chat/completions", [], pid)
        time.sleep(2)
        idle = {name: suite.rss_kb(processes.started[name].pid) for name in ("A", "B")}
        for name in ("A", "B"):
            oha.run(targets[name], 2, args.connections, label="warm")
        results: dict = {"A": [], "B": []}
        for round_ in range(args.rounds):
            order = ("A", "B") if round_ % 2 == 0 else ("B", "A")
            for name in order:
                fixed = oha.run(targets[name], args.seconds, args.connections, args.rate, label="fixed")
                closed = oha.run(targets[name], args.seconds, 64, None, label="closed")
                row = {
                    "p50": fixed["p50"],
                    "p99": fixed["p99"],
                    "cpu": fixed.get("cpu_us_per_request"),
                    "ok": fixed["success"],
                    "closed_rate": closed["ok_rate"],
                    "closed_cpu": closed.get("cpu_us_per_request"),
                }
                if args.streams:
                    pid = processes.started[name].pid
                    base = suite.rss_kb(pid)
                    argv = [stream_bin, "--url", targets[name + "-stream"].url, "--concurrency", str(args.streams)]
                    argv += ["--streams", str(args.streams), "--chunks", "64", "--chunk-ms", "50"]
                    client = suite.subprocess.Popen(argv, stdout=suite.subprocess.PIPE, stderr=suite.subprocess.PIPE)
                    peak = base
                    while client.poll() is None:
                        peak = max(peak, suite.rss_kb(pid))
                        time.sleep(0.02)
                    row["stream_kib_each"] = (peak - base) / args.streams
                results[name].append(row)
                print(f"round {round_ + 1} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if v is not None), flush=True)
        print(f"idle RSS KiB: A {idle['A']}, B {idle['B']}")
        for key in results["A"][0]:
            a = suite.median([r[key] for r in results["A"]])
            b = suite.median([r[key] for r in results["B"]])
            if a is None or b is None:
                continue
            print(f"{key:>16}: A {a:10.1f}   B {b:10.1f}   B/A {b / a if a else float('nan'):.3f}")
    finally:
        processes.stop_all()
    return 0


if __name__ == "__main__":
    os.chdir(policies.ROOT)
    sys.exit(main())
