"""`make bench`: every path side by side in one run, rounds interleaved, medians of rounds.

Paths: direct to the mock; nginx; the Pingora floor (bench/floor: a bare Pingora proxy, Sluice's
framework with nothing on it); Sluice passthrough; Sluice full chain with tracing on and off;
Sluice cache hit; LiteLLM's proxy and Portkey's gateway when installed (bench/install-peers.sh).
Phases, in order (BENCH_PHASES picks some):

  latency     fixed rates (open loop, oha -q with latency correction), every path once per round
  throughput  highest rate held BENCH_HOLD s with 100 % success and p99 < 10 ms, per path
  streams     64 SSE events 20 ms apart at 1, 100, 1000 concurrent streams (sluice-stream-bench)
  memory      Sluice's RSS idle, with 1000 open streams, after they end
  scaling     CPU per request and p99 by tenants, provider keys, filters; reload at the most tenants

Everything runs on 127.0.0.1 and is bounded in time; every process started here is stopped at
the end, on failure and on Ctrl-C. Raw results go to bench-out/last/ (results.json, one JSON file
per load run, server logs); BENCHMARKS.md is written from results.json by bench/report.py.

Knobs (environment), defaults in brackets; BENCH_SMOKE=1 sets every one to a few-seconds run
that proves the harness works and writes bench-out/smoke/BENCHMARKS.md (no time thresholds):
  BENCH_ROUNDS [3] BENCH_DURATION [6 s per fixed-rate run] BENCH_RATES [500,2000]
  BENCH_CONNECTIONS [32] BENCH_PROBE [5 s unthrottled] BENCH_PROBE_CONNECTIONS [64]
  BENCH_HOLD [30 s] BENCH_SCREEN [5 s per step of the throughput search] BENCH_P99_LIMIT_MS [10]
  BENCH_STREAM_LEVELS [1,100,1000] BENCH_STREAM_CHUNKS [64] BENCH_STREAM_CHUNK_MS [20]
  BENCH_SINGLE_STREAMS [5: streams run one after another at level 1]
  BENCH_MEMORY_STREAMS [1000] BENCH_TENANTS [1,1000,100000] BENCH_PROVIDER_KEYS [1,1000]
  BENCH_SCALING_RATE [2000] BENCH_SCALING_DURATION [5] BENCH_RELOADS [3] BENCH_RELOAD_RATE [500]
  BENCH_PEERS [1] BENCH_PHASES [latency,throughput,streams,memory,scaling]
  BENCH_PROFILE [production: the container image's build; release, debug] BENCH_SKIP_BUILD BENCH_OUTPUT [BENCHMARKS.md]
"""

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policies  # noqa: E402 (after the path set-up above)
import report  # noqa: E402

ROOT = policies.ROOT
PHASES = ("latency", "throughput", "streams", "memory", "scaling")


class BenchError(Exception):
    """A failure that ends the run: a server died, a path answered wrongly, a tool is missing."""


def log(message: str) -> None:
    print(f"== {message}", file=sys.stderr, flush=True)


def env_int(name: str, default: int, smoke: int) -> int:
    return int(os.environ.get(name) or (smoke if SMOKE else default))


def env_list(name: str, default: str, smoke: str) -> list[int]:
    return [int(x) for x in (os.environ.get(name) or (smoke if SMOKE else default)).split(",") if x]


SMOKE = os.environ.get("BENCH_SMOKE") == "1"


@dataclass
class Settings:
    rounds: int = env_int("BENCH_ROUNDS", 3, 1)
    duration: int = env_int("BENCH_DURATION", 6, 1)
    rates: list = field(default_factory=lambda: env_list("BENCH_RATES", "500,2000", "200"))
    connections: int = env_int("BENCH_CONNECTIONS", 32, 8)
    probe: int = env_int("BENCH_PROBE", 5, 1)
    probe_connections: int = env_int("BENCH_PROBE_CONNECTIONS", 64, 8)
    hold: int = env_int("BENCH_HOLD", 30, 2)
    screen: int = env_int("BENCH_SCREEN", 5, 1)
    p99_limit_ms: int = env_int("BENCH_P99_LIMIT_MS", 10, 10)
    stream_levels: list = field(default_factory=lambda: env_list("BENCH_STREAM_LEVELS", "1,100,1000", "1,5,20"))
    stream_chunks: int = env_int("BENCH_STREAM_CHUNKS", 64, 8)
    stream_chunk_ms: int = env_int("BENCH_STREAM_CHUNK_MS", 20, 5)
    single_streams: int = env_int("BENCH_SINGLE_STREAMS", 5, 2)
    memory_streams: int = env_int("BENCH_MEMORY_STREAMS", 1000, 20)
    tenants: list = field(default_factory=lambda: env_list("BENCH_TENANTS", "1,1000,100000", "1,10,100"))
    provider_keys: list = field(default_factory=lambda: env_list("BENCH_PROVIDER_KEYS", "1,1000", "1,10"))
    scaling_rate: int = env_int("BENCH_SCALING_RATE", 2000, 200)
    scaling_duration: int = env_int("BENCH_SCALING_DURATION", 5, 1)
    reloads: int = env_int("BENCH_RELOADS", 3, 1)
    reload_rate: int = env_int("BENCH_RELOAD_RATE", 500, 100)
    peers: bool = env_int("BENCH_PEERS", 1, 0) == 1
    phases: list = field(
        default_factory=lambda: (os.environ.get("BENCH_PHASES") or ",".join(PHASES)).split(",")
    )
    profile: str = os.environ.get("BENCH_PROFILE") or "production"
    skip_build: bool = bool(os.environ.get("BENCH_SKIP_BUILD"))
    output: Path = Path(
        os.environ.get("BENCH_OUTPUT") or ("bench-out/smoke/BENCHMARKS.md" if SMOKE else "BENCHMARKS.md")
    )


# --- processes --------------------------------------------------------------------------------


class Processes:
    """The servers this run started, each in a process group of its own (LiteLLM and nginx
    have workers), stopped by their own ids at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: dict[str, subprocess.Popen] = {}
        # Every process starts with OpenSSL's default trust, as in a container image: a shell
        # that names a CA bundle (SSL_CERT_FILE) would make Sluice parse it into each TLS context.
        self.base_env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}

    def start(self, name: str, argv: list, env: dict | None = None) -> subprocess.Popen:
        logfile = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (lives as long as the process)
        process = subprocess.Popen(
            argv,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self.base_env, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        self.started[name] = process
        return process

    def check_alive(self) -> None:
        for name, process in self.started.items():
            if process.poll() is not None:
                raise BenchError(f"{name} exited during the run (see {self.work / (name + '.log')})")

    def stop(self, name: str) -> None:
        process = self.started.pop(name)
        self._signal(process, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal(process, signal.SIGKILL)
            process.wait(timeout=5)

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)

    @staticmethod
    def _signal(process: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(process.pid, signum)  # the group this run created for it
        except ProcessLookupError:
            pass


def free_ports(count: int) -> list[int]:
    """Distinct free ports below the ephemeral range, so no client socket can hold them."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    """One request: (status, headers, body); an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def wait_ready(processes: Processes, name: str, url: str, headers: dict | None = None, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    process = processes.started[name]
    while True:
        try:
            status, _, _ = http("GET", url, headers=headers, timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        if process.poll() is not None:
            tail = (processes.work / f"{name}.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"{name} exited before it was ready:\n{tail}")
        if time.monotonic() > deadline:
            raise BenchError(f"{name} was not ready after {limit:.0f} s ({url})")
        time.sleep(0.2)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_snapshot(root: int) -> dict:
    """CPU seconds used so far by the whole machine and by ROOT's process tree (this script, the
    servers it started, the load generators); the report says how much CPU other processes
    took meanwhile, and how much the hypervisor took from this VM (steal: time a virtual CPU
    was ready to run but the host ran something else), since the figures are only as good as that."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
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
    wall = float(Path("/proc/uptime").read_text().split()[0])
    busy = (user + nice + system + irq + softirq) / tick
    return {"wall": wall, "busy": busy, "ours": ours / tick, "steal": steal / tick}


def cpu_seconds(pid: int) -> float:
    """CPU time of one process so far, all its threads: the scheduler's nanosecond run time per
    thread (`/proc/PID/task/*/schedstat`), since `/proc/PID/stat`'s clock ticks (10 ms) are too
    coarse for a few thousand requests; a thread that ended is not counted (Sluice's threads
    live as long as the process)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


# --- the load generator -----------------------------------------------------------------------


@dataclass
class Target:
    """One path: where requests go and what they carry."""

    key: str
    url: str
    headers: list = field(default_factory=list)
    pid: int | None = None  # the server whose CPU per request is measured (Sluice's)


class Oha:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.runs = 0

    def run(self, target: Target, seconds: float, connections: int, rate: int | None = None, label: str = "") -> dict:
        """One load run against TARGET; its figures (see `figures`), with Sluice's CPU per request
        when the target names a process."""
        self.runs += 1
        out = self.work / "runs" / f"{self.runs:04d}-{target.key}-{label or 'run'}.json"
        argv = ["oha", "--no-tui", "--output-format", "json", "-w", "-t", "5s", "-m", "POST"]
        argv += ["-H", "content-type: application/json", "-d", policies.CHAT_BODY]
        for header in target.headers:
            argv += ["-H", header]
        argv += ["-c", str(connections), "-z", f"{seconds}s"]
        if rate:
            argv += ["-q", str(rate), "--latency-correction"]
        argv.append(target.url)
        cpu_before = cpu_seconds(target.pid) if target.pid else None
        with open(out, "wb") as sink:
            done = subprocess.run(argv, stdout=sink, stderr=subprocess.PIPE, timeout=seconds + 60)
        if done.returncode != 0:
            raise BenchError(f"oha failed on {target.key}: {done.stderr.decode(errors='replace')[-500:]}")
        result = figures(json.loads(out.read_text()))
        if cpu_before is not None and result["ok"]:
            result["cpu_us_per_request"] = (cpu_seconds(target.pid) - cpu_before) * 1e6 / result["total"]
        result["file"] = out.name
        return result


def figures(data: dict) -> dict:
    """A run's requests, successes (HTTP 200), rates and latency percentiles (µs) from oha's JSON."""
    codes = data.get("statusCodeDistribution") or {}
    # Requests cut off by the end of the run are not failures (-w waits for them anyway).
    errors = {k: v for k, v in (data.get("errorDistribution") or {}).items() if "deadline" not in k}
    ok = codes.get("200", 0)
    total = sum(codes.values()) + sum(errors.values())
    errors.update({f"HTTP {code}": n for code, n in codes.items() if code != "200"})
    seconds = data["summary"]["total"] or 1e-9
    percentiles = data.get("latencyPercentiles") or {}
    return {
        "total": total,
        "ok": ok,
        "all_ok": total > 0 and ok == total,
        "success": 100.0 * ok / total if total else 0.0,
        "rate": total / seconds,
        "ok_rate": ok / seconds,
        "p50": (percentiles.get("p50") or 0.0) * 1e6,
        "p99": (percentiles.get("p99") or 0.0) * 1e6,
        "errors": {k: v for k, v in errors.items() if v},
    }


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- the run ----------------------------------------------------------------------------------


class HeldSearch:
    """One path's search for the highest rate it holds (see `Bench.throughput`): screens first,
    at most five, then holds, at most four."""

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.rate = max(int(ceiling * 0.9), 10)
        self.held_best = 0
        self.failed_lowest: int | None = None
        self.screens: list[dict] = []
        self.holds: list[dict] = []
        self.searching = True
        self.holding = False

    def screened(self, screen: dict) -> None:
        self.screens.append(screen)
        if screen["held"]:
            self.held_best = self.rate
        else:
            self.failed_lowest = self.rate
        if self.failed_lowest is None or len(self.screens) == 5:
            self.searching = False  # 90 % of the ceiling held (near enough the top), or enough tries
        elif not self.held_best:
            self.rate = max(int(self.rate * 0.6), 10)
        elif self.failed_lowest - self.held_best > 0.1 * self.failed_lowest:
            self.rate = (self.held_best + self.failed_lowest) // 2
        else:
            self.searching = False
        if not self.searching:
            self.rate = self.held_best
            self.holding = bool(self.held_best)

    def held(self, hold: dict) -> None:
        self.holds.append(hold)
        if hold["held"] or len(self.holds) == 4:
            self.holding = False
        else:
            self.rate = max(int(self.rate * 0.9), 10)

    def result(self) -> dict:
        best = next((h for h in self.holds if h["held"]), None)
        return {
            "ceiling": self.ceiling,
            "held_rate": best["rate_asked"] if best else None,
            "hold": best or (self.holds[-1] if self.holds else self.screens[-1]),
            "screens": self.screens,
            "holds": self.holds,
        }


class Bench:
    def __init__(self, settings: Settings, work: Path) -> None:
        self.s = settings
        self.work = work
        self.processes = Processes(work)
        self.oha = Oha(work)
        self.results: dict = {
            "settings": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()},
                "body": policies.CHAT_BODY,
                "smoke": SMOKE,
            }
        }
        self.targets: dict[str, Target] = {}
        self.bin = ROOT / "target" / settings.profile

    # -- set-up --

    def start_servers(self) -> None:
        s = self.s
        (mock, sink, nginx, floor, full_proxy, full_admin, lean_proxy, lean_admin, litellm, portkey) = free_ports(10)
        self.ports = {"mock": mock, "sink": sink}
        log(f"starting the mock (:{mock}), the OTLP sink (:{sink}), nginx (:{nginx}), the Pingora floor (:{floor}), two Sluices")
        self.processes.start("mock", [self.bin / "sluice-mock", "--listen", f"127.0.0.1:{mock}", "--no-record"])
        self.processes.start("otlp-sink", [sys.executable, ROOT / "bench" / "otlp_sink.py", str(sink)])
        (self.work / "nginx.conf").write_text(policies.nginx_conf(self.work, nginx, mock))
        self.processes.start(
            "nginx",
            ["nginx", "-c", self.work / "nginx.conf", "-p", self.work, "-e", self.work / "nginx-error.log", "-g", "daemon off;"],
        )
        # Pingora with nothing on it: the framework's own cost, below Sluice's passthrough.
        self.processes.start(
            "floor",
            [self.bin / "sluice-bench-floor", "--listen", f"127.0.0.1:{floor}", "--upstream", f"127.0.0.1:{mock}", "--strip-prefix", "/floor"],
        )
        sluices = {"sluice-full": (full_proxy, full_admin, sink), "sluice-lean": (lean_proxy, lean_admin, None)}
        for name, (proxy, admin, otlp) in sluices.items():
            policies.write_policy(self.work / f"{name}.yaml", policies.sluice_main(proxy, admin, mock, otlp))
            self.processes.start(name, [self.bin / "sluice", "run", "-c", self.work / f"{name}.yaml"], {"SLUICE_LOG": "warn"})
        self.wait("mock", f"http://127.0.0.1:{mock}/_mock/health")
        self.wait("otlp-sink", f"http://127.0.0.1:{sink}/stats")
        self.wait("nginx", f"http://127.0.0.1:{nginx}/mock/_mock/health")
        self.wait("floor", f"http://127.0.0.1:{floor}/floor/_mock/health")
        for name, (_, admin, _) in sluices.items():
            self.wait(name, f"http://127.0.0.1:{admin}/readyz")
        time.sleep(2)  # ready is before the tokenizers' patterns finish compiling on their thread
        self.results["idle_rss_kb"] = {name: rss_kb(self.processes.started[name].pid) for name in sluices}

        full_pid, lean_pid = self.processes.started["sluice-full"].pid, self.processes.started["sluice-lean"].pid
        tenant = f"authorization: Bearer {policies.caller_key(0)}"
        chat = "/v1/chat/completions"
        self.targets = {
            "direct": Target("direct", f"http://127.0.0.1:{mock}{chat}"),
            "nginx": Target("nginx", f"http://127.0.0.1:{nginx}/mock{chat}"),
            "floor": Target("floor", f"http://127.0.0.1:{floor}/floor{chat}", pid=self.processes.started["floor"].pid),
            "pass": Target("pass", f"http://127.0.0.1:{lean_proxy}/pass{chat}", pid=lean_pid),
            "full": Target("full", f"http://127.0.0.1:{full_proxy}/full{chat}", [tenant, "cache-control: no-cache"], full_pid),
            "full-notrace": Target(
                "full-notrace", f"http://127.0.0.1:{lean_proxy}/full{chat}", [tenant, "cache-control: no-cache"], lean_pid
            ),
            "hit": Target("hit", f"http://127.0.0.1:{full_proxy}/full{chat}", [tenant], full_pid),
        }
        self.results["peers"] = {}
        if s.peers:
            self.start_peers(mock, litellm, portkey)

    def start_peers(self, mock: int, litellm: int, portkey: int) -> None:
        peers = ROOT / "bench-out" / "peers"
        chat = "/v1/chat/completions"
        litellm_bin = peers / "litellm" / "bin" / "litellm"
        if litellm_bin.exists():
            version = (peers / "litellm" / "VERSION").read_text().strip()
            (self.work / "litellm.yaml").write_text(policies.litellm_config(mock))
            (self.work / "litellm-logging.json").write_text(policies.LITELLM_LOGGING)
            # Two workers, one a core, as Sluice has two threads and nginx two workers.
            self.processes.start(
                "litellm",
                [litellm_bin, "--config", self.work / "litellm.yaml", "--host", "127.0.0.1", "--port", str(litellm),
                 "--num_workers", "2", "--log_config", self.work / "litellm-logging.json"],
                {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"},
            )
            self.peer_ready("litellm", version, f"http://127.0.0.1:{litellm}/health/liveliness", Target("litellm", f"http://127.0.0.1:{litellm}{chat}"))
        else:
            self.results["peers"]["litellm"] = {"available": False, "why": "not installed (bench/install-peers.sh failed or was not run)"}
        portkey_main = peers / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
        if portkey_main.exists():
            version = (peers / "portkey" / "VERSION").read_text().strip()
            self.processes.start("portkey", ["node", portkey_main, f"--port={portkey}"])
            headers = ["x-portkey-provider: openai", f"x-portkey-custom-host: http://127.0.0.1:{mock}/v1", "authorization: Bearer sk-mock-portkey"]
            self.peer_ready("portkey", version, f"http://127.0.0.1:{portkey}/", Target("portkey", f"http://127.0.0.1:{portkey}{chat}", headers))
        else:
            self.results["peers"]["portkey"] = {"available": False, "why": "not installed (bench/install-peers.sh failed or was not run)"}

    def peer_ready(self, name: str, version: str, health: str, target: Target) -> None:
        """A peer that does not start or does not answer a chat completion is reported and left
        out, not fatal: the suite measures Sluice first."""
        try:
            self.wait(name, health, limit=120)
            self.check_answer(target)
        except BenchError as error:
            log(f"{name} left out: {error}")
            self.results["peers"][name] = {"available": False, "version": version, "why": str(error)[:300]}
            if name in self.processes.started:
                self.processes.stop(name)
            return
        self.results["peers"][name] = {"available": True, "version": version}
        target.pid = self.processes.started[name].pid
        self.targets[name] = target

    def wait(self, name: str, url: str, limit: float = 60) -> None:
        wait_ready(self.processes, name, url, limit=limit)

    def check_answer(self, target: Target, want_cache: str | None = None) -> None:
        headers = {"content-type": "application/json"}
        headers.update(dict(h.split(": ", 1) for h in target.headers))
        status, answer_headers, body = http("POST", target.url, policies.CHAT_BODY.encode(), headers)
        if status != 200 or b'"chat.completion"' not in body:
            raise BenchError(f"{target.key}: first chat completion answered {status}: {body[:300]!r}")
        if want_cache and answer_headers.get("x-sluice-cache") != want_cache:
            raise BenchError(f"{target.key}: expected x-sluice-cache: {want_cache}, got {answer_headers.get('x-sluice-cache')}")

    def check_paths(self) -> None:
        """One real call on every path first (a misrouted path would only show as 0 % success),
        and the cache paths do what they say (the first full-chain call stores the entry every
        cache-hit request is answered from)."""
        for key, target in self.targets.items():
            self.check_answer(target, {"full": "refresh", "full-notrace": "refresh", "hit": "hit"}.get(key))

    def paths(self) -> list[str]:
        order = ["direct", "nginx", "floor", "pass", "full", "full-notrace", "hit", "litellm", "portkey"]
        return [key for key in order if key in self.targets]

    # -- phases --

    def probe(self) -> None:
        """Unthrottled closed-loop runs, interleaved over rounds: each path's ceiling, which sets
        where the throughput search starts and which fixed rates a path can be sent at all."""
        ceilings: dict = {key: [] for key in self.paths()}
        for round_index in range(self.s.rounds):
            for key in self.paths():
                log(f"probe round {round_index + 1}: {key} unthrottled {self.s.probe} s")
                run = self.oha.run(self.targets[key], self.s.probe, self.s.probe_connections, label="probe")
                ceilings[key].append(run["ok_rate"])
                self.processes.check_alive()
        self.results["probe"] = {key: {"rates": rates, "median": median(rates)} for key, rates in ceilings.items()}

    def ceiling(self, key: str) -> float:
        return self.results.get("probe", {}).get(key, {}).get("median") or float("inf")

    def over_capacity(self, key: str, rate: int) -> bool:
        return key in ("litellm", "portkey") and self.ceiling(key) < 1.25 * rate

    def latency(self) -> None:
        """Every path at each fixed rate once per round (A B C … A B C …); a peer whose ceiling is
        below 1.25× a rate is not sent it (it would only queue, and its backlog would spill into
        the next path's run). Sluice's paths always are: their figures are the point."""
        out: dict = {}
        for rate in self.s.rates:
            rounds = []
            for round_index in range(self.s.rounds):
                runs = {}
                for key in self.paths():
                    if self.over_capacity(key, rate):
                        continue
                    log(f"latency {rate} req/s round {round_index + 1}: {key}")
                    runs[key] = self.oha.run(self.targets[key], self.s.duration, self.s.connections, rate, label=f"fixed{rate}")
                    self.processes.check_alive()
                rounds.append(runs)
            out[str(rate)] = summarize_rounds(rounds, self.paths())
            out[str(rate)]["skipped"] = [k for k in self.paths() if self.over_capacity(k, rate)]
        self.results["latency"] = out

    def held(self, target: Target, rate: int, seconds: int, label: str) -> dict:
        run = self.oha.run(target, seconds, self.s.probe_connections, rate, label=label)
        run["rate_asked"] = rate
        run["held"] = run["all_ok"] and run["p99"] < self.s.p99_limit_ms * 1000
        return run

    def screen(self, target: Target, rate: int) -> dict:
        """A short run at `rate`, tried once more if it fails: on two shared cores one scheduling
        stall of a few hundred milliseconds puts a 5 s screen's p99 over the limit, and a search
        that stepped down on it would report the stall, not the path."""
        first = self.held(target, rate, self.s.screen, "screen")
        if first["held"]:
            return first
        second = self.held(target, rate, self.s.screen, "screen")
        chosen = second if second["held"] else first
        chosen["retried"] = True
        return chosen

    def throughput(self) -> None:
        """Per path, the highest rate that holds (100 % success, p99 under the limit), searched
        with short screens — first 90 % of the unthrottled ceiling, then 40 % lower steps until
        one holds, then halving the gap between the best that held and the lowest that did not —
        then the full hold at the best; while the hold fails, up to three more 10 % lower (a
        screen's 5 s can pass at a rate whose backlog only builds up over the 30 s hold). The
        paths' searches advance together, one step of each per pass (A B C … A B C …), so a
        slow drift of the machine meets every path alike, as in the other phases."""
        searches = {}
        for key in self.paths():
            ceiling = self.ceiling(key)
            if ceiling == float("inf"):
                ceiling = self.oha.run(self.targets[key], self.s.probe, self.s.probe_connections, label="probe")["ok_rate"]
            searches[key] = HeldSearch(ceiling)
        while any(search.searching for search in searches.values()):
            for key, search in searches.items():
                if search.searching:
                    log(f"throughput {key}: screen at {search.rate} req/s for {self.s.screen} s")
                    search.screened(self.screen(self.targets[key], search.rate))
            self.processes.check_alive()
        while any(search.holding for search in searches.values()):
            for key, search in searches.items():
                if search.holding:
                    log(f"throughput {key}: hold at {search.rate} req/s for {self.s.hold} s")
                    search.held(self.held(self.targets[key], search.rate, self.s.hold, "hold"))
            self.processes.check_alive()
        self.results["throughput"] = {key: search.result() for key, search in searches.items()}

    def stream_targets(self) -> dict:
        """The streaming paths: direct, nginx, Sluice passthrough and full chain (tracing on; the
        cache is bypassed by no-cache so every stream comes from the mock)."""
        return {key: self.targets[key] for key in ("direct", "nginx", "floor", "pass", "full") if key in self.targets}

    def stream_run(self, target: Target, concurrency: int, streams: int, chunk_ms: int | None = None) -> subprocess.Popen:
        argv = [
            self.bin / "sluice-stream-bench", "--url", target.url, "--concurrency", str(concurrency),
            "--streams", str(streams), "--chunks", str(self.s.stream_chunks),
            "--chunk-ms", str(chunk_ms or self.s.stream_chunk_ms),
        ]
        for header in target.headers:
            argv += ["--header", header]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    @staticmethod
    def stream_result(process: subprocess.Popen, what: str) -> dict:
        out, err = process.communicate(timeout=300)
        if process.returncode != 0:
            raise BenchError(f"stream client failed on {what}: {err.decode(errors='replace')[-500:]}")
        return json.loads(out)

    def streams(self) -> None:
        targets = self.stream_targets()
        out = {}
        for level in self.s.stream_levels:
            total = self.s.single_streams if level == 1 else level
            rounds = []
            for round_index in range(self.s.rounds):
                runs = {}
                for key, target in targets.items():
                    log(f"streams x{level} round {round_index + 1}: {key}")
                    runs[key] = self.stream_result(self.stream_run(target, level, total), f"{key} x{level}")
                    self.processes.check_alive()
                rounds.append(runs)
            out[str(level)] = summarize_streams(rounds, list(targets))
        self.results["streams"] = out

    def memory(self) -> None:
        """Sluice's RSS (full chain) before, while and after MEMORY_STREAMS streams are open at
        once, each 64 events 50 ms apart (3.2 s), sampled every 20 ms."""
        out = {}
        for name, key in (("sluice-full", "full"), ("sluice-lean", "pass")):
            pid = self.processes.started[name].pid
            time.sleep(1)
            baseline = rss_kb(pid)
            log(f"memory: {self.s.memory_streams} open streams through {name}")
            client = self.stream_run(self.targets[key], self.s.memory_streams, self.s.memory_streams, chunk_ms=50)
            peak = baseline
            while client.poll() is None:
                peak = max(peak, rss_kb(pid))
                time.sleep(0.02)
            streams = self.stream_result(client, f"memory {name}")
            time.sleep(2)
            after = rss_kb(pid)
            out[name] = {
                "idle_start_kb": self.results["idle_rss_kb"][name],
                "baseline_kb": baseline,
                "peak_kb": peak,
                "after_kb": after,
                "streams": self.s.memory_streams,
                "complete": streams["complete"],
            }
        self.results["memory"] = out
        self.results["memory_minimal"] = self.minimal_idle()

    def minimal_idle(self) -> dict:
        """Idle RSS of a Sluice with the least policy (one passthrough route), before and after
        a few requests: the process's floor, apart from what a policy's features load."""
        proxy, admin = free_ports(2)
        policies.write_policy(self.work / "sluice-minimal.yaml", policies.sluice_minimal(proxy, admin, self.ports["mock"]))
        self.processes.start("sluice-minimal", [self.bin / "sluice", "run", "-c", self.work / "sluice-minimal.yaml"], {"SLUICE_LOG": "warn"})
        self.wait("sluice-minimal", f"http://127.0.0.1:{admin}/readyz")
        pid = self.processes.started["sluice-minimal"].pid
        time.sleep(1)
        idle = rss_kb(pid)
        target = Target("minimal", f"http://127.0.0.1:{proxy}/pass/v1/chat/completions", pid=pid)
        self.check_answer(target)
        self.oha.run(target, 1, 4, label="minimal")
        time.sleep(1)
        after = rss_kb(pid)
        self.processes.stop("sluice-minimal")
        return {"idle_kb": idle, "after_requests_kb": after}

    def scaling(self) -> None:
        """Separate Sluices with 1, 1,000 and 45,000 tenants (tracing off); on each the full
        chain, and on the smallest the provider-key pools and the filter ladder; the traced main
        Sluice's full chain as the ladder's last step. Every configuration runs once per round
        at SCALING_RATE; CPU per request is Sluice's CPU time over the run ÷ requests."""
        mock = self.ports["mock"]
        instances = {}
        for count in self.s.tenants:
            proxy, admin = free_ports(2)
            name = f"sluice-tenants-{count}"
            policy_path = self.work / f"{name}.yaml"
            policy = policies.sluice_scaling(proxy, admin, mock, count, self.s.provider_keys, self.work / f"{name}-keys.yaml")
            policies.write_policy(policy_path, policy)
            started = time.monotonic()
            self.processes.start(name, [self.bin / "sluice", "run", "-c", policy_path], {"SLUICE_LOG": "warn"})
            self.wait(name, f"http://127.0.0.1:{admin}/readyz", limit=300)
            time.sleep(2)
            instances[count] = {
                "name": name, "proxy": proxy, "admin": admin, "policy": policy_path,
                "startup_s": time.monotonic() - started, "pid": self.processes.started[name].pid,
            }
            instances[count]["idle_rss_kb"] = rss_kb(instances[count]["pid"])
        smallest, largest = min(self.s.tenants), max(self.s.tenants)
        limited = f"authorization: Bearer {policies.caller_key(0)}"
        open_key = f"authorization: Bearer {policies.caller_key(smallest)}"
        chat = "/v1/chat/completions"
        configs: dict[str, Target] = {}
        for count, instance in instances.items():
            configs[f"tenants-{count}"] = Target(
                f"tenants-{count}", f"http://127.0.0.1:{instance['proxy']}/full{chat}", [limited, "cache-control: no-cache"], instance["pid"]
            )
        small = instances[smallest]
        for count in self.s.provider_keys:
            configs[f"keys-{count}"] = Target(
                f"keys-{count}", f"http://127.0.0.1:{small['proxy']}/keys-{count}{chat}", [limited, "cache-control: no-cache"], small["pid"]
            )
        for step, _ in policies.LADDER:
            headers = {"none": [], "request-id": [], "auth": [open_key], "limits": [limited]}.get(
                step, [limited, "cache-control: no-cache"]
            )
            configs[f"ladder-{step}"] = Target(
                f"ladder-{step}", f"http://127.0.0.1:{small['proxy']}/ladder-{step}{chat}", headers, small["pid"]
            )
        configs["ladder-tracing"] = self.targets["full"]
        for target in configs.values():
            self.check_answer(target)
        rounds = []
        for round_index in range(self.s.rounds):
            runs = {}
            for key, target in configs.items():
                log(f"scaling round {round_index + 1}: {key} at {self.s.scaling_rate} req/s")
                runs[key] = self.oha.run(target, self.s.scaling_duration, self.s.connections, self.s.scaling_rate, label="scaling")
                self.processes.check_alive()
            rounds.append(runs)
        self.results["scaling"] = {
            "instances": {str(k): {x: v[x] for x in ("startup_s", "idle_rss_kb")} for k, v in instances.items()},
            "runs": summarize_rounds(rounds, list(configs), reference=None),
            "reload": self.reload_under_load(instances[largest], configs[f"tenants-{largest}"], largest),
        }

    def reload_under_load(self, instance: dict, target: Target, tenant_count: int) -> dict:
        """Policy reloads of the largest Sluice while it serves RELOAD_RATE req/s: each reload
        adds a tenant (a real change, not `unchanged`), its time is the admin call's."""
        seconds = 2 + 2 * self.s.reloads
        load = subprocess.Popen(
            ["oha", "--no-tui", "--output-format", "json", "-w", "-t", "5s", "-m", "POST", "-H", "content-type: application/json",
             "-d", policies.CHAT_BODY, *sum((["-H", h] for h in target.headers), []), "-c", str(self.s.connections),
             "-z", f"{seconds}s", "-q", str(self.s.reload_rate), "--latency-correction", target.url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        policy = json.loads(instance["policy"].read_text())
        times, outcomes = [], []
        time.sleep(1)
        for index in range(self.s.reloads):
            policy["tenants"].append({"name": f"added-{index}", "tier": "limited"})
            policies.write_policy(instance["policy"], policy)
            started = time.monotonic()
            status, _, body = http("POST", f"http://127.0.0.1:{instance['admin']}/admin/reload", b"", timeout=60)
            times.append(time.monotonic() - started)
            outcomes.append(f"{status} {body[:120].decode(errors='replace')}")
            log(f"reload {index + 1} at {tenant_count} tenants: {times[-1] * 1000:.0f} ms ({status})")
            time.sleep(1)
        out, err = load.communicate(timeout=seconds + 60)
        if load.returncode != 0:
            raise BenchError(f"oha failed during the reloads: {err.decode(errors='replace')[-500:]}")
        (self.work / "runs" / "reload-load.json").write_bytes(out)
        return {"tenants": tenant_count, "times_s": times, "outcomes": outcomes, "load": figures(json.loads(out))}

    # -- everything --

    def run(self) -> None:
        s = self.s
        started = time.monotonic()
        self.start_servers()
        self.check_paths()
        self.results["machine_start"] = cpu_snapshot(os.getpid())
        self.results["host"] = report.machine()
        if {"latency", "throughput"} & set(s.phases):
            self.probe()
        for phase in PHASES:
            if phase in s.phases:
                getattr(self, phase)()
        self.results["machine_end"] = cpu_snapshot(os.getpid())
        status, _, body = http("GET", f"http://127.0.0.1:{self.ports['sink']}/stats")
        self.results["otlp_sink"] = json.loads(body) if status == 200 else None
        self.results["wall_s"] = time.monotonic() - started
        if SMOKE:
            self.verify()

    def verify(self) -> None:
        """The smoke run's checks (no timing): every request of every fixed-rate and scaling run
        answered 200, every stream came whole, spans reached the collector. A full run reports
        failures in BENCHMARKS.md instead of stopping on them."""
        problems = []
        blocks = list((self.results.get("latency") or {}).values())
        if self.results.get("scaling"):
            blocks.append(self.results["scaling"]["runs"])
        for block in blocks:
            problems += [f"{key}: {p['errors']}" for key, p in block["paths"].items() if not p["all_ok"]]
        for level, block in (self.results.get("streams") or {}).items():
            for key, p in block["paths"].items():
                if p["failed"] or p["events_per_stream"] != self.s.stream_chunks + 1:
                    problems.append(f"streams x{level} {key}: {p['failed']} failed, {p['events_per_stream']} events a stream")
        if not (self.results.get("otlp_sink") or {}).get("requests"):
            problems.append("no span reached the OTLP collector")
        if problems:
            raise BenchError("smoke run found broken paths: " + "; ".join(problems))
        self.results["tools"] = {"oha": subprocess.run(["oha", "--version"], capture_output=True, text=True).stdout.strip()}


def summarize_rounds(rounds: list[dict], keys: list[str], reference: str | None = "direct") -> dict:
    """Per path, medians over rounds of p50, p99, CPU per request and — against REFERENCE in the
    same round — added p50 and p99; plus the rounds themselves."""
    out: dict = {"rounds": rounds, "paths": {}}
    for key in keys:
        runs = [r[key] for r in rounds if key in r]
        if not runs:
            continue
        summary = {
            "p50": median([r["p50"] for r in runs]),
            "p99": median([r["p99"] for r in runs]),
            "cpu_us_per_request": median([r.get("cpu_us_per_request") for r in runs]),
            "success_min": min(r["success"] for r in runs),
            "all_ok": all(r["all_ok"] for r in runs),
            "errors": {k: sum(r["errors"].get(k, 0) for r in runs) for k in set().union(*(r["errors"] for r in runs))},
        }
        if reference and key != reference:
            pairs = [(r[key], r[reference]) for r in rounds if key in r and reference in r]
            summary["added_p50"] = median([a["p50"] - b["p50"] for a, b in pairs])
            summary["added_p99"] = median([a["p99"] - b["p99"] for a, b in pairs])
        out["paths"][key] = summary
    return out


def summarize_streams(rounds: list[dict], keys: list[str]) -> dict:
    """Per path, medians over rounds of TTFB and event delay (and added over direct in the same
    round); held-back events and failures summed over rounds."""
    out: dict = {"rounds": rounds, "paths": {}}
    for key in keys:
        runs = [r[key] for r in rounds]
        summary = {
            "ttfb_p50": median([r["ttfb_us"]["p50"] for r in runs]),
            "ttfb_p99": median([r["ttfb_us"]["p99"] for r in runs]),
            "delay_p50": median([r["delay_us"]["p50"] for r in runs]),
            "delay_p99": median([r["delay_us"]["p99"] for r in runs]),
            "delay_max": max(r["delay_us"]["max"] for r in runs),
            "held_back": sum(r["held_back"] for r in runs),
            "multi_event_reads": sum(r["multi_event_reads"] for r in runs),
            "events": sum(r["events"] for r in runs),
            "streams": sum(r["streams"] for r in runs),
            "failed": sum(r["failed"] for r in runs),
            "events_per_stream": min(r["events_per_stream"] for r in runs),
        }
        if key != "direct":
            for figure, field_name in (("ttfb", "ttfb_us"), ("delay", "delay_us")):
                for q in ("p50", "p99"):
                    summary[f"added_{figure}_{q}"] = median(
                        [r[key][field_name][q] - r["direct"][field_name][q] for r in rounds]
                    )
        out["paths"][key] = summary
    return out


def build(settings: Settings) -> None:
    if settings.skip_build:
        return
    log(f"building the binaries ({settings.profile})")
    argv = ["cargo", "build", "-p", "sluice", "-p", "sluice-mock", "-p", "sluice-bench-streams", "-p", "sluice-bench-floor"]
    if settings.profile != "debug":
        argv += ["--profile", settings.profile]
    subprocess.run(argv, cwd=ROOT, check=True)


def main() -> int:
    settings = Settings()
    unknown = set(settings.phases) - set(PHASES)
    if unknown:
        log(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
        return 2
    for tool in ("oha", "nginx"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            log(f"{tool} is missing: run `make deps`")
            return 2
    build(settings)
    work = ROOT / "bench-out" / ("smoke" if SMOKE else "last")
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    (work / "runs").mkdir(parents=True)
    bench = Bench(settings, work)
    # SIGTERM (make interrupted, CI timeout) ends the run through the same clean-up as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        bench.run()
    except (BenchError, KeyboardInterrupt, subprocess.SubprocessError) as error:
        log(f"bench failed: {error!r}; logs and the results so far in {work}")
        return 1
    finally:
        bench.processes.stop_all()
        (work / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    report.write(bench.results, settings.output)
    log(f"wrote {settings.output} ({bench.results['wall_s'] / 60:.1f} min); raw results in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
