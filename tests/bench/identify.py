"""What identifying the caller costs per new connection, seen from the client.

Usage, as root (it creates a cgroup), from anywhere:
    cargo build --release
    .venv/bin/python tests/bench/identify.py --broker target/release/imds-broker

Serves the broker on 127.0.0.1 (moto as STS beside it) with one rule matching this
interpreter by `exe`, so that for every connection the broker must find the process
holding the peer socket. This script then moves itself into a cgroup of its own, as a
service would be in, and measures, in three settings:
  - no extra processes;
  - N idle processes (default 2,000), each holding its own sockets (a TCP listener, a
    UDP socket, a unix socket pair), in a cgroup of their own, as unrelated services are;
  - the same N idle processes in the client's cgroup (and uid): the worst case.
and for each, client-side latency from connect() to the end of the response of:
  - `put, same process`: a token PUT on a fresh connection, always from this process;
  - `get, same process`: a role-listing GET with a token on a fresh connection;
  - `put, new process`: one token PUT from each of P short-lived new processes (first
    contact: nothing cached about the caller).
Prints p50/p90/p99/max in microseconds. Not a test, and not run by CI: numbers to read.
Goal: p99 < 500 us, with no growth with the number of unrelated processes.

`--match uid` runs the same with a uid-only rule, which needs no process lookup: the
difference between the two runs is what finding the process costs.

Everything it starts is stopped, and the cgroup removed, on exit; the idle processes die
with their parent (PR_SET_PDEATHSIG) even if this script is killed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (  # noqa: E402  (after the path set-up above)
    BROKER_BIN,
    HELD_PY,
    PYTHON,
    ROLE_LISTING_PATH,
    CgroupTree,
    HeldProcess,
    Rule,
    broker_config,
    hermetic_env,
    serve_broker,
    start_moto,
    write_config,
)

READY_TIMEOUT_S = 120  # for N processes to fork and open their sockets
REQUEST_TIMEOUT_S = 5
WARMUP = 100
MAX_RESPONSE_BYTES = 1 << 16
PR_SET_PDEATHSIG = 1
UNLIMITED = 1_000_000
CLIENT_CGROUP = "bench-client.service"


# --------------------------------------------------------------------------- idle processes


def hold_idle(count: int) -> None:
    """(--hold-idle mode.) Fork `count` idle children, each with sockets of its own; print
    `ready COUNT` once all hold them; when stdin closes, let them exit and reap them."""
    release_r, release_w = os.pipe()  # children block reading it; EOF lets them go
    ready_r, ready_w = os.pipe()  # each child writes one byte once its sockets are open
    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            idle_child(release_r, release_w, ready_r, ready_w)  # never returns
        children.append(pid)
    os.close(release_r)
    os.close(ready_w)
    ready = 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready < count and time.monotonic() < deadline:
        if select.select([ready_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(ready_r, 4096)
            if not chunk:
                break
            ready += len(chunk)
    print(f"ready {ready}", flush=True)
    sys.stdin.read()
    os.close(release_w)
    reap(children)


def idle_child(release_r: int, release_w: int, ready_r: int, ready_w: int) -> None:
    try:
        # Die with the spawner, whatever happens to it.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(release_w)
        os.close(ready_r)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        pair = socket.socketpair()
        os.write(ready_w, b".")
        os.close(ready_w)
        os.read(release_r, 1)  # blocks until the spawner closes its end
        del tcp, udp, pair
    finally:
        os._exit(0)


def reap(children: list[int]) -> None:
    """Wait (bounded) for the children, then SIGKILL any left, by pid: all are ours."""
    pending = set(children)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.01)
        pending.discard(pid)
    for pid in pending:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def idle_processes(count: int, cgroups: CgroupTree, cgroup: str) -> HeldProcess:
    """Start the spawner held (clients/held.py), place it in `cgroup` (its children are
    born there), then let it fork `count` idle processes."""
    spawner = HeldProcess(
        [str(PYTHON), str(HELD_PY), __file__, "--hold-idle", str(count)], hermetic_env(), Path(tempfile.gettempdir())
    )
    spawner.wait_held()
    cgroups.place(spawner.pid, cgroup)
    spawner.release()
    line = spawner.read_line(READY_TIMEOUT_S + 10)
    if line != f"ready {count}":
        spawner.stop()
        raise SystemExit(f"idle processes not ready: {line!r}")
    return spawner


# --------------------------------------------------------------------------- measuring


def timed_request(address: tuple[str, int], request: bytes) -> tuple[int, bytes]:
    """Nanoseconds from connect() to the end of the response (the broker closes the
    connection: `Connection: close`), and the response."""
    start = time.perf_counter_ns()
    with socket.create_connection(address, timeout=REQUEST_TIMEOUT_S) as conn:
        conn.sendall(request)
        response = b""
        while len(response) < MAX_RESPONSE_BYTES and (chunk := conn.recv(65536)):
            response += chunk
    return time.perf_counter_ns() - start, response


def put_request(address: tuple[str, int]) -> bytes:
    return (
        f"PUT /latest/api/token HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
        "X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nConnection: close\r\n\r\n"
    ).encode()


def get_request(address: tuple[str, int], token: str) -> bytes:
    return (
        f"GET {ROLE_LISTING_PATH} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
        f"X-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
    ).encode()


class Unexpected(Exception):
    """A response other than 200: the numbers would be a lie."""


def ok(response: bytes) -> bytes:
    """The body of a 200 response."""
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise Unexpected(f"unexpected response: {response[:300]!r}")
    return body


def same_process(address: tuple[str, int], request: bytes, count: int) -> list[int]:
    for _ in range(WARMUP):
        ok(timed_request(address, request)[1])
    samples = []
    for _ in range(count):
        elapsed, response = timed_request(address, request)
        ok(response)
        samples.append(elapsed)
    return samples


def new_processes(address: tuple[str, int], count: int) -> list[int]:
    """One PUT from each of `count` fresh processes (this script, --one-put)."""
    samples = []
    for _ in range(count):
        result = subprocess.run(
            [str(PYTHON), __file__, "--one-put", f"{address[0]}:{address[1]}"],
            capture_output=True,
            text=True,
            timeout=30,
            env=hermetic_env(),
        )
        if result.returncode != 0:
            raise Unexpected(f"--one-put failed: {result.stderr}")
        samples.append(int(result.stdout))
    return samples


def one_put(address: str) -> None:
    """(--one-put mode.) Print the latency of one PUT from this new process."""
    host, port = address.rsplit(":", 1)
    elapsed, response = timed_request((host, int(port)), put_request((host, int(port))))
    ok(response)
    print(elapsed)


def percentile(sorted_samples: list[int], fraction: float) -> float:
    return sorted_samples[min(len(sorted_samples) - 1, round(fraction * (len(sorted_samples) - 1)))] / 1000


def report(setting: str, kind: str, samples: list[int]) -> None:
    ordered = sorted(samples)
    p50, p90, p99 = (percentile(ordered, f) for f in (0.50, 0.90, 0.99))
    print(
        f"{setting:<34} {kind:<18} n={len(samples):<5} p50={p50:8.0f}  p90={p90:8.0f}  "
        f"p99={p99:8.0f}  max={ordered[-1] / 1000:8.0f}  us",
        flush=True,
    )


def measure(setting: str, address: tuple[str, int], args: argparse.Namespace) -> None:
    put = put_request(address)
    token = ok(timed_request(address, put)[1]).decode()
    report(setting, "put, same process", same_process(address, put, args.requests))
    report(setting, "get, same process", same_process(address, get_request(address, token), args.requests))
    report(setting, "put, new process", new_processes(address, args.new_processes))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", type=Path, default=BROKER_BIN, help="imds-broker binary (default: debug build)")
    parser.add_argument("--idle", type=int, default=2000, help="idle processes to add (0: only the setting without)")
    parser.add_argument("--requests", type=int, default=2000, help="samples per same-process measurement")
    parser.add_argument("--new-processes", type=int, default=200, help="samples of first-contact PUTs")
    parser.add_argument("--match", choices=["exe", "uid"], default="exe", help="the rule matches this client by")
    parser.add_argument("--hold-idle", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-put", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold_idle is not None:
        return hold_idle(args.hold_idle)
    if args.one_put is not None:
        return one_put(args.one_put)
    if os.geteuid() != 0:
        raise SystemExit("run as root: the broker must read other processes' /proc entries, and a cgroup is created")

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imdsb-bench-")))
        moto = stack.enter_context(start_moto(workdir / "moto"))
        this_exe = os.path.realpath(PYTHON)
        match = {"uid": os.geteuid(), "exe": this_exe} if args.match == "exe" else {"uid": os.geteuid()}
        rules = [Rule("bench", match)]
        config = write_config(
            workdir / "imds-broker.toml",
            broker_config(listen="127.0.0.1:0", sts_endpoint=moto.endpoint, state_dir=workdir / "state", rules=rules)
            # One client sends thousands of requests a second here: lift the per-caller limit.
            + f"\n[limits]\nrequests_per_second = {UNLIMITED}\nburst = {UNLIMITED}\n",
        )
        broker = stack.enter_context(
            serve_broker(workdir / "broker", config, log_format="json", binary=args.broker.resolve())
        )
        host, port = broker.addresses[0].rsplit(":", 1)
        address = (host, int(port))
        print(f"broker {args.broker} on {broker.addresses[0]}; rule: {match}", flush=True)
        cgroups = CgroupTree()
        stack.callback(cgroups.remove)
        # The broker and moto stay where they are; this script (the client) moves, and back.
        home = cgroups.mount / Path("/proc/self/cgroup").read_text().split("0::", 1)[1].split()[0].lstrip("/")
        cgroups.place(os.getpid(), CLIENT_CGROUP)
        stack.callback((home / "cgroup.procs").write_text, str(os.getpid()))
        print(f"client in cgroup {cgroups.path(CLIENT_CGROUP)}", flush=True)

        try:
            measure("no extra processes", address, args)
            crowded = (
                (f"{args.idle} idle, own cgroup", "idle.service"),
                (f"{args.idle} idle, client's cgroup", CLIENT_CGROUP),
            )
            for setting, cgroup in crowded if args.idle > 0 else ():
                spawner = idle_processes(args.idle, cgroups, cgroup)
                try:
                    measure(setting, address, args)
                finally:
                    spawner.finish()
        except Unexpected as err:
            raise SystemExit(f"{err}\n{broker.stderr_tail(10)}") from None


if __name__ == "__main__":
    main()
