"""Load benchmarks: numbers to read, not a test (CI does not run it).

Usage, as root, from anywhere (wrk from Debian: `apt-get install wrk`):
    .venv/bin/python tests/bench/load.py [--duration 10] [--threads 2] [--connections 64]
        [--rounds 3] [--idle 10000] [--apps 1000] [--only hot|idle|apps] [--pin] [--ld-preload LIB]

Builds the release daemon and examples/hello_bare (the same HTTP stack with no logic),
starts moto as STS on loopback, and measures:

1. Hot path: wrk on a cached-credential GET (`.../security-credentials/<role>` with a
   token: identity, relay refusal, rate limit, token check, policy, cache, audit event)
   and on the bare server, same parameters, alternating for `--rounds` rounds:
   requests/s, p50, p99 and the broker/bare ratio. Goal: >= 0.5x, p99 < 1 ms. With
   `--pin` the servers get the last CPU and wrk the others: on a small machine wrk otherwise
   preempts the server it measures, and the p99 of both servers is the scheduler's.
2. Idle connections: `--idle` TCP connections opened and left silent, then a normal
   client's token PUT + credential GET on a new connection, timed; once with the limits
   raised (every idle connection is accepted and held), once with the default limits and
   the flood from another uid than the normal client (the flood is capped per caller).
   Then how long the daemon takes to close the silent connections.
3. Memory: `--apps` [[app]] entries, all prefetched (one cached credential each; at the
   default STS budget of 10 AssumeRole/s, 1,000 take about 100 s; the admin socket's
   /readyz says when), then the same wrk load with the caller matching the last rule:
   requests/s, VmRSS before, during and after, VmHWM. Goal: < 30 MiB.

Everything listens on 127.0.0.1, every wait is bounded, and every process it starts is
stopped on exit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (  # after the path set-up above
    ACCOUNT_ID,
    REPO_ROOT,
    Server,
    as_user,
    hermetic_env,
    serve_broker,
    serving,
    start_moto,
    write_config,
)

RELEASE = REPO_ROOT / "target" / "release"
BROKER = RELEASE / "imds-broker"
BARE = RELEASE / "examples" / "hello_bare"
ROLE = "bench"
CREDENTIALS_PATH = f"/latest/meta-data/iam/security-credentials/{ROLE}"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
# The normal client of the flood scenario: a uid with a rule of its own.
OTHER_UID = 61001

# Limits out of the benchmark's way: it measures throughput, not the limiter.
RAISED_LIMITS = """
[limits]
requests_per_second = 1000000
burst = 1000000
max_connections = 100000
max_connections_per_caller = 100000
"""
FD_LIMIT = 200_000  # idle sockets here and in the broker, plus everything else
FD_HEADROOM = 1_000
REQUEST_TIMEOUT_S = 5
# At the default STS budget (10 AssumeRole/s), 1,000 apps take about 100 s.
PREFETCH_TIMEOUT_S = 300
SAMPLE_INTERVAL_S = 0.25
# The daemon closes a connection that sends no request head within HEADER_READ_TIMEOUT
# (10 s); wait this long for it to do so.
IDLE_CLOSE_WAIT_S = 20
NORMAL_CLIENT_REPEATS = 20
IDLE_BATCH = 32
IDLE_PAUSE_S = 0.001
SECTIONS = ("hot", "idle", "apps")


# --------------------------------------------------------------------------- plumbing


def build() -> None:
    subprocess.run(
        ["cargo", "build", "--release", "--bin", "imds-broker", "--example", "hello_bare"],
        cwd=REPO_ROOT,
        check=True,
        timeout=3600,
    )


def app_toml(name: str, uid: int, prefetch: bool) -> str:
    return f"""
[[app]]
name = "{name}"
role_arn = "arn:aws:iam::{ACCOUNT_ID}:role/{name}"
prefetch = {str(prefetch).lower()}
[app.match]
uid = {uid}
"""


def config_text(workdir: Path, sts: str, apps: str, limits: str = RAISED_LIMITS) -> str:
    return f"""\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{workdir / "state"}"

[sts]
region = "us-east-1"
endpoint_url = "{sts}"
{limits}{apps}"""


@contextmanager
def broker(workdir: Path, text: str, launcher: list[str] | None = None) -> Iterator[Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "imds-broker.toml", text)
    with serve_broker(workdir, config, binary=BROKER, rust_log="info", launcher=launcher or []) as server:
        yield server


def address(server: Server) -> tuple[str, int]:
    host, port = server.addresses[0].rsplit(":", 1)
    return host, int(port)


def request(addr: tuple[str, int], method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*addr, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def token(addr: tuple[str, int]) -> str:
    status, body = request(addr, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    assert status == 200, (status, body)
    return body


def warm(addr: tuple[str, int]) -> str:
    """A token, and the credential cache filled (the hot path is the cached GET)."""
    tok = token(addr)
    status, body = request(addr, "GET", CREDENTIALS_PATH, {TOKEN_HEADER: tok})
    assert status == 200 and json.loads(body)["Code"] == "Success", (status, body)
    return tok


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    bad: int  # non-2xx answers, socket errors and timeouts
    # The server's CPU time (user + system) per request: on a busy machine requests/s move with
    # what else runs, this much less.
    cpu_us: float | None = None

    def row(self, name: str) -> str:
        cpu = "" if self.cpu_us is None else f"{self.cpu_us:.1f}"
        return (
            f"| {name} | {self.rps:,.0f} | {self.p50_us:,.0f} | {self.p99_us:,.0f} | {cpu} | {self.requests:,} "
            f"| {self.bad} |"
        )


TABLE_HEAD = (
    "| server | requests/s | p50 (us) | p99 (us) | CPU us/request | requests | non-2xx/errors |\n|---|---|---|---|---|---|---|"
)
CLOCK_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * CLOCK_TICK_S


UNITS_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0}


def wrk(addr: tuple[str, int], token: str | None, args: argparse.Namespace, pid: int | None = None) -> WrkResult:
    """wrk's numbers, and the CPU time `pid` (the server) spent per request, if given."""
    cpu_before = None if pid is None else cpu_seconds(pid)
    argv = [*args.client_launcher, "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if token is not None:
        argv += ["-H", f"{TOKEN_HEADER}: {token}"]
    argv.append(f"http://{addr[0]}:{addr[1]}{CREDENTIALS_PATH}")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=args.duration + 60).stdout
    cpu_s = None if cpu_before is None else cpu_seconds(pid) - cpu_before

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)$", out, re.MULTILINE).groups()
        return float(value) * UNITS_US[unit]

    bad = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    if errors := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        bad += sum(int(n) for n in errors.groups())
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return WrkResult(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_us=latency("50"),
        p99_us=latency("99"),
        requests=requests,
        bad=bad,
        cpu_us=None if cpu_s is None else cpu_s / max(requests, 1) * 1e6,
    )


class Sampler:
    """Samples a process's VmRSS in the background while a load runs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak_rss = max(self.peak_rss, memory(self.pid)["VmRSS"])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- scenarios


def pinning(args: argparse.Namespace) -> str:
    if not args.pin:
        return "servers and wrk sharing every CPU"
    return f"servers on CPU {args.server_launcher[-1]}, wrk on CPU {args.client_launcher[-1]}"


def hot_path(broker_server: Server, bare: Server, args: argparse.Namespace) -> None:
    addr = address(broker_server)
    tok = warm(addr)
    rounds: dict[str, list[WrkResult]] = {"imds-broker": [], "hello_bare": []}
    peak_rss = 0
    for _ in range(args.rounds):
        rounds["hello_bare"].append(wrk(address(bare), None, args, bare.proc.pid))
        with Sampler(broker_server.proc.pid) as sampler:
            rounds["imds-broker"].append(wrk(addr, tok, args, broker_server.proc.pid))
        peak_rss = max(peak_rss, sampler.peak_rss)
    print(
        f"\n## Hot path: cached credential GET, wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s, {args.rounds} round(s), bare and broker alternating, {pinning(args)}\n"
    )
    print(TABLE_HEAD)
    for name, results in rounds.items():
        for i, result in enumerate(results, 1):
            print(result.row(f"{name} round {i}"))
    median = {name: statistics.median(r.rps for r in results) for name, results in rounds.items()}
    p99 = statistics.median(r.p99_us for r in rounds["imds-broker"])
    cpu = {name: statistics.median(r.cpu_us for r in results) for name, results in rounds.items()}
    print(
        f"\nmedian requests/s: broker {median['imds-broker']:,.0f}, bare {median['hello_bare']:,.0f}, "
        f"ratio {median['imds-broker'] / median['hello_bare']:.2f} (goal >= 0.5); broker median p99 "
        f"{p99:,.0f} us (goal < 1000); median CPU per request: broker {cpu['imds-broker']:.1f} us, "
        f"bare {cpu['hello_bare']:.1f} us"
    )
    mem = memory(broker_server.proc.pid)
    print(
        f"broker memory, 1 app: VmRSS peak under load {peak_rss / 1024:.1f} MiB, "
        f"VmHWM {mem['VmHWM'] / 1024:.1f} MiB; bare VmHWM {memory(bare.proc.pid)['VmHWM'] / 1024:.1f} MiB"
    )


def open_idle(addr: tuple[str, int], count: int) -> tuple[list[socket.socket], int, float]:
    """`count` connections that never send a byte; returns them, the failures, the time taken."""
    idle, failed = [], 0
    started = time.monotonic()
    for i in range(count):
        if i % IDLE_BATCH == 0:
            # On loopback connect() completes in the kernel at once; a client that never
            # yields its CPU fills the listen backlog (128) before the daemon runs to accept,
            # and a dropped SYN is retried only after 1 s.
            time.sleep(IDLE_PAUSE_S)
        try:
            idle.append(socket.create_connection(addr, timeout=REQUEST_TIMEOUT_S))
        except OSError:
            failed += 1
    return idle, failed, time.monotonic() - started


# Run as the normal client (possibly another uid): token PUT + credential GET on a new
# connection each time, timed from connect() to the end of the second answer.
NORMAL_CLIENT = """
import http.client, json, sys, time
host, port, path, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
results = []
for _ in range(repeats):
    started = time.monotonic()
    statuses = []
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        r = conn.getresponse(); tok = r.read().decode(); statuses.append(r.status)
        conn.request("GET", path, headers={"X-aws-ec2-metadata-token": tok})
        r = conn.getresponse(); r.read(); statuses.append(r.status)
        conn.close()
    except OSError as e:
        statuses.append(type(e).__name__)
    results.append({"statuses": statuses, "ms": (time.monotonic() - started) * 1000})
print(json.dumps(results))
"""


def normal_client(addr: tuple[str, int], path: str, uid: int | None) -> list[dict]:
    prefix = [] if uid is None else as_user(uid)
    argv = [*prefix, "/usr/bin/python3", "-c", NORMAL_CLIENT, addr[0], str(addr[1]), path, str(NORMAL_CLIENT_REPEATS)]
    # cwd "/": the other uid may not be able to enter this one.
    out = subprocess.run(argv, env=hermetic_env(), cwd="/", capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


def wait_closed(idle: list[socket.socket]) -> tuple[int, float]:
    """How many of `idle` the daemon closes within IDLE_CLOSE_WAIT_S, and when the last went."""
    sel = selectors.DefaultSelector()
    for s in idle:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed, last = 0, 0.0
    started = time.monotonic()
    deadline = started + IDLE_CLOSE_WAIT_S
    while closed < len(idle) and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            try:
                data = key.fileobj.recv(4096)
            except ConnectionError:
                data = b""
            if not data:  # EOF or reset: the daemon closed it (a refusal's 503 comes first)
                sel.unregister(key.fileobj)
                closed += 1
                last = time.monotonic() - started
    sel.close()
    return closed, last


def idle_connections(workdir: Path, sts: str, args: argparse.Namespace) -> None:
    print(f"\n## {args.idle:,} idle connections, then a normal client (PUT + GET, new connection each)\n")
    print(
        "| setting | idle opened (failed) in | broker fds | normal client statuses | p50 / max (ms) | idle closed by daemon |"
    )
    print("|---|---|---|---|---|---|")
    me = os.geteuid()
    settings = [
        ("raised limits, same uid", RAISED_LIMITS, app_toml(ROLE, me, False), None),
        (
            f"default limits, flood uid {me}, client uid {OTHER_UID}",
            "",
            app_toml("flood", me, False) + app_toml(ROLE, OTHER_UID, False),
            OTHER_UID,
        ),
    ]
    for i, (name, limits, apps, client_uid) in enumerate(settings):
        with broker(workdir / f"idle-{i}", config_text(workdir / f"idle-{i}", sts, apps, limits)) as server:
            addr = address(server)
            idle, failed, took = open_idle(addr, args.idle)
            try:
                fds = open_fds(server.proc.pid)
                results = normal_client(addr, CREDENTIALS_PATH, client_uid)
                closed, last = wait_closed(idle)
            finally:
                for s in idle:
                    s.close()
        statuses = sorted({"/".join(map(str, r["statuses"])) for r in results})
        ms = [r["ms"] for r in results]
        print(
            f"| {name} | {len(idle):,} ({failed}) in {took:.1f} s | {fds:,} | {', '.join(statuses)} x{len(results)} | "
            f"{statistics.median(ms):.1f} / {max(ms):.1f} | {closed:,} of {len(idle):,}, last after {last:.1f} s |"
        )


def admin_get(state_dir: Path, path: str) -> tuple[int, str]:
    """GET `path` from the daemon's admin API on its default unix socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(REQUEST_TIMEOUT_S)
        s.connect(str(state_dir / "admin.sock"))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def wait_ready(state_dir: Path) -> tuple[float, str]:
    """Seconds until /readyz says every prefetch app has credentials (bounded), and its
    last answer."""
    started = time.monotonic()
    while True:
        try:
            status, body = admin_get(state_dir, "/readyz")
        except (FileNotFoundError, ConnectionRefusedError):
            # The admin socket is bound just after the `listening on` line.
            status, body = 0, "admin socket not there yet"
        if status == 200 or time.monotonic() - started > PREFETCH_TIMEOUT_S:
            return time.monotonic() - started, body.strip()
        time.sleep(1)


def many_apps(workdir: Path, sts: str, args: argparse.Namespace) -> None:
    me = os.geteuid()
    # Every other app first: the benchmark's caller matches the last rule, the policy's worst case.
    apps = "".join(app_toml(f"app-{i:04d}", 100_000 + i, True) for i in range(args.apps - 1))
    apps += app_toml(ROLE, me, True)
    with broker(workdir, config_text(workdir, sts, apps), args.server_launcher) as server:
        pid = server.proc.pid
        prefetch_s, ready = wait_ready(workdir / "state")
        addr = address(server)
        tok = warm(addr)
        idle = memory(pid)
        with Sampler(pid) as sampler:
            result = wrk(addr, tok, args, pid)
        after = memory(pid)
    print(
        f"\n## {args.apps:,} apps, all prefetch (default STS budget), caller matching the last rule\n\n"
        f"/readyz after {prefetch_s:.0f} s: {ready[:200]}\n"
    )
    print(TABLE_HEAD)
    print(result.row(f"imds-broker, {args.apps} apps"))
    print(
        f"\nVmRSS before load {idle['VmRSS'] / 1024:.1f} MiB, peak under load {sampler.peak_rss / 1024:.1f} MiB, "
        f"after {after['VmRSS'] / 1024:.1f} MiB; VmHWM {after['VmHWM'] / 1024:.1f} MiB (goal < 30 MiB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, help="wrk threads (default: 2, or 1 with --pin)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the servers under wrk load (hot path, apps) on the last CPU and wrk on the others "
        "(taskset), so the load generator does not preempt the server it measures",
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/broker wrk rounds")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections")
    parser.add_argument("--apps", type=int, default=1_000, help="configured apps for the memory run")
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only this section (repeatable; default: all)"
    )
    parser.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    parser.add_argument(
        "--ld-preload",
        metavar="LIB",
        help="LD_PRELOAD for every process started (e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2, "
        "to compare allocators: the daemon uses the system allocator)",
    )
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    args.server_launcher = ["taskset", "-c", str(cpus[-1])] if args.pin else []
    args.client_launcher = ["taskset", "-c", ",".join(map(str, cpus[:-1]))] if args.pin else []
    if args.threads is None:
        args.threads = 1 if args.pin else 2
    if os.geteuid() != 0:
        raise SystemExit("run as root: the flood scenario runs its normal client as another uid")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    if not args.no_build:
        build()
    if args.ld_preload:
        os.environ["LD_PRELOAD"] = args.ld_preload
    # Inherited by the broker: it holds one descriptor per idle connection too. Only up to
    # the hard limit: raising that needs CAP_SYS_RESOURCE, which a container may not give.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    if fds < args.idle + FD_HEADROOM:
        raise SystemExit(f"the open-file limit ({fds}) is too low for {args.idle} idle connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (fds, hard))

    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="imdsb-bench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        moto = stack.enter_context(start_moto(workdir / "moto"))
        # Other work on the machine skews every number: the load average shows whether there was any.
        print(
            f"# imds-broker load benchmarks ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"load average {os.getloadavg()[0]:.2f}, LD_PRELOAD {os.environ.get('LD_PRELOAD', 'none')})"
        )

        sections = args.only or SECTIONS
        if "hot" in sections:
            with ExitStack() as servers:
                bare = servers.enter_context(
                    serving("hello_bare", [*args.server_launcher, str(BARE)], hermetic_env(), workdir / "bare")
                )
                hot = servers.enter_context(
                    broker(
                        workdir / "hot",
                        config_text(workdir / "hot", moto.endpoint, app_toml(ROLE, os.geteuid(), False)),
                        args.server_launcher,
                    )
                )
                hot_path(hot, bare, args)
        if "idle" in sections:
            idle_connections(workdir, moto.endpoint, args)
        if "apps" in sections:
            many_apps(workdir / "apps", moto.endpoint, args)
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
