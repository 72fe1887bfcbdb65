"""What an unmapped user can make the broker do with `exe_sha256` rules, and what a legitimate
caller sees meanwhile (the security review's finding 4).

Usage, as root (the attacker runs as uid 61003), from anywhere:
    cargo build --release
    .venv/bin/python tests/bench/exe_hash_flood.py --broker target/release/imds-broker

Serves the broker on 127.0.0.1 (moto as STS beside it) with one rule matching this
interpreter's executable by `exe_sha256` only, so every caller is a candidate for hashing.
Then, in three rounds, measures a legitimate client (this script, whose executable the rule
names) doing a token PUT on a fresh connection, REQUESTS times, from connect() to the end of
the response:
  - `quiet`: nobody else;
  - `huge`: an attacker as uid 61003 runs an 8 GiB sparse copy of the interpreter and opens
    connections with token PUTs as fast as it can;
  - `churn`: the attacker runs a 200 MiB copy and touches it before every connection, so every
    connection brings a new file version (new mtime and ctime).
Prints the legitimate client's p50/p99/max, the attacker's connection count and answers, and
the broker's CPU time per round. Every loop is bounded by count and time; everything is
stopped on exit. Numbers to read, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402  (after the path set-up above)
    BROKER_BIN,
    PYTHON,
    Rule,
    as_user,
    broker_config,
    hermetic_env,
    serve_broker,
    start_moto,
    write_config,
)
from identify import ok, percentile, put_request, timed_request  # noqa: E402

ATTACKER_UID = 61003
HUGE_BYTES = 8 << 30
CHURN_BYTES = 200 << 20
ATTACK_SECONDS = 60  # an upper bound; each round stops the attacker when the client is done
MAX_ATTACK_CONNECTIONS = 100_000
UNLIMITED = 1_000_000

ATTACKER = r"""
import os, signal, socket, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
host, port, touch, seconds, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "touch", float(sys.argv[4]), int(sys.argv[5])
request = ("PUT /latest/api/token HTTP/1.1\r\nHost: %s:%d\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n" % (host, port)).encode()
exe = os.readlink("/proc/self/exe")
deadline, sent, answers = time.monotonic() + seconds, 0, {}
print("started", flush=True)
while time.monotonic() < deadline and sent < limit and not stop:
    if touch:
        os.utime(exe)
    try:
        with socket.create_connection((host, port), timeout=30) as c:
            c.sendall(request)
            status = c.recv(64).split(b" ")[1].decode()
    except OSError as e:
        status = type(e).__name__
    answers[status] = answers.get(status, 0) + 1  # an interrupted one counts as its error
    sent += 1
print(sent, answers, flush=True)
"""


def sparse_copy(source: Path, target: Path, size: int) -> None:
    shutil.copyfile(source, target)
    os.truncate(target, size)  # zeros after the ELF: it still runs
    target.chmod(0o755)


def broker_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(address: tuple[str, int], count: int) -> list[int]:
    request = put_request(address)
    return [ok_time(address, request) for _ in range(count)]


def ok_time(address: tuple[str, int], request: bytes) -> int:
    elapsed, response = timed_request(address, request)
    ok(response)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", type=Path, default=BROKER_BIN)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    own_exe = Path(os.path.realpath("/proc/self/exe"))
    digest = hashlib.sha256(own_exe.read_bytes()).hexdigest()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="imdsb-flood-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        workdir.chmod(0o755)
        huge, churn = workdir / "huge-python3", workdir / "churn-python3"
        sparse_copy(own_exe, huge, HUGE_BYTES)
        sparse_copy(own_exe, churn, CHURN_BYTES)
        os.chown(churn, ATTACKER_UID, ATTACKER_UID)  # the attacker touches its own copy
        moto = stack.enter_context(start_moto(workdir / "moto"))
        config = write_config(
            workdir / "imds-broker.toml",
            broker_config(
                listen="127.0.0.1:0",
                sts_endpoint=moto.endpoint,
                state_dir=workdir / "state",
                rules=[Rule("hashed", {"exe_sha256": digest})],
            )
            # The request rate limit would hide what identification costs; connection caps stay.
            + f"\n[limits]\nrequests_per_second = {UNLIMITED}\nburst = {UNLIMITED}\n",
        )
        broker = stack.enter_context(serve_broker(workdir / "broker", config, binary=args.broker.resolve()))
        host, port = broker.addresses[0].rsplit(":", 1)
        address = (host, int(port))
        measure(address, 20)  # warm-up: this interpreter's digest is cached from here on

        print(f"{'round':8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'broker CPU s':>13}  attacker")
        for name, exe, mode in [("quiet", None, ""), ("huge", huge, "stay"), ("churn", churn, "touch")]:
            attacker = None
            if exe is not None:
                attacker = subprocess.Popen(
                    [*as_user(ATTACKER_UID), str(exe), "-c", ATTACKER, host, port, mode, str(ATTACK_SECONDS), str(MAX_ATTACK_CONNECTIONS)],
                    env=hermetic_env(),
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
                assert attacker.stdout is not None
                assert attacker.stdout.readline().strip() == "started"
                time.sleep(1)  # a benchmark, not a test: let the flood build up first
            cpu_before = broker_cpu_seconds(broker.proc.pid)
            times = sorted(measure(address, args.requests))
            cpu = broker_cpu_seconds(broker.proc.pid) - cpu_before
            summary = ""
            if attacker is not None:
                attacker.terminate()
                out, _ = attacker.communicate(timeout=60)
                summary = out.strip() or "(stopped before its summary)"
            p50, p99 = (percentile(times, f) / 1000 for f in (0.50, 0.99))  # us -> ms
            print(f"{name:8} {p50:8.2f} {p99:8.2f} {times[-1] / 1e6:8.2f} {cpu:13.2f}  {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
