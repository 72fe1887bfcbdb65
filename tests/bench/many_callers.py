"""10,000 distinct callers against one broker: is every map that grows with callers bounded,
and does the memory come back once they are gone (issue 17, fault 5)?

Usage, as root, from the repository:
    cargo build --release --bin imds-broker
    .venv/bin/python tests/bench/many_callers.py --broker target/release/imds-broker \\
        [--callers 10000] [--wave 100] [--idle 70] [--served-every 2]

Serves the broker on 127.0.0.1 (moto as STS beside it) with one rule, `gid = 100000`. Each
caller is a child forked by this script that drops to its own uid (100000 + i) with
`os.setresuid`, one of `--served-every` of them with gid 100000 (matched: served, so it
creates rate-limiter, repeat-filter and audit state) and the others with gid 100001 (no rule
matches: refused, which creates per-caller state all the same: a valid attack). Each does a
token PUT, the role listing and, when it has a role, the credentials GET over loopback, on one
keep-alive connection. Callers run in waves of `--wave` at a time (bounded: at most --callers
children, each with a 10 s socket timeout).

Sampled at 0, 2,500, 5,000 and 10,000 callers, and after `--idle` seconds with no caller
(then one more caller, whose request runs the rate limiter's idle sweep): the broker's RSS
(VmRSS), open descriptors, threads, and every `imds_broker_caller_state_entries` map size the
broker exports (an older binary exports none: "-"). Prints a table and one JSON line.
Numbers to read, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (  # noqa: E402  (after the path set-up above)
    BROKER_BIN,
    Rule,
    broker_config,
    serve_broker,
    start_moto,
    write_config,
)

SERVED_GID = 100_000
REFUSED_GID = 100_001
FIRST_UID = 100_000
CHECKPOINTS = (0, 2_500, 5_000, 10_000)
APP = "many-callers"
SOCKET_TIMEOUT_S = 10.0


def http(conn: socket.socket, request: bytes) -> tuple[int, bytes]:
    """One request on a keep-alive connection: status and body (Content-Length framed)."""
    conn.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the head")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    want = int(length.group(1)) if length else 0
    while len(body) < want:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return status, body


def caller(host: str, port: int) -> int:
    """What a child does, already as its own uid: 0 served, 1 refused, 2 anything else."""
    try:
        with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S) as conn:
            hdr = f"Host: {host}:{port}\r\n"
            status, token = http(
                conn,
                f"PUT /latest/api/token HTTP/1.1\r\n{hdr}X-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n".encode(),
            )
            if status != 200:
                return 2
            auth = f"X-aws-ec2-metadata-token: {token.decode()}\r\n"
            path = "/latest/meta-data/iam/security-credentials/"
            status, role = http(conn, f"GET {path} HTTP/1.1\r\n{hdr}{auth}\r\n".encode())
            if status == 404:
                return 1
            if status != 200:
                return 2
            status, _ = http(conn, f"GET {path}{role.decode()} HTTP/1.1\r\n{hdr}{auth}\r\n".encode())
            return 0 if status == 200 else 2
    except OSError:
        return 2


def run_wave(host: str, port: int, first: int, count: int, served_every: int) -> dict[str, int]:
    """Forks `count` callers (uids first..first+count), waits for all; outcome counts."""
    pids = []
    for i in range(first, first + count):
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                gid = SERVED_GID if i % served_every == 0 else REFUSED_GID
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(FIRST_UID + i, FIRST_UID + i, FIRST_UID + i)
                code = caller(host, port)
            finally:
                os._exit(code)
        pids.append(pid)
    outcome = {"served": 0, "refused": 0, "error": 0}
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        outcome[{0: "served", 1: "refused"}.get(code, "error")] += 1
    return outcome


def admin_get(sock_path: Path, path: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(SOCKET_TIMEOUT_S)
        s.connect(str(sock_path))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.split(b"\r\n\r\n", 1)[1].decode()


def sample(pid: int, admin: Path, label: str) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", status, re.M).group(1))  # noqa: E731
    metrics = admin_get(admin, "/metrics")
    maps = {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'^imds_broker_caller_state_entries\{map="([^"]+)"\} (\S+)$', metrics, re.M)
    }
    gauge = lambda name: next(  # noqa: E731
        (int(float(v)) for v in re.findall(rf"^{name} (\S+)$", metrics, re.M)), None
    )
    return {
        "at": label,
        "rss_kib": field("VmRSS"),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": field("Threads"),
        "open_connections": gauge("imds_broker_open_connections"),
        "audit_queue": gauge("imds_broker_audit_queue_events"),
        "maps": maps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", type=Path, default=BROKER_BIN)
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--wave", type=int, default=100)
    parser.add_argument("--idle", type=float, default=70.0, help="seconds without callers before the last sample")
    parser.add_argument("--served-every", type=int, default=2, help="1 in N callers matches the rule")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (callers drop to uids 100000 and up)", file=sys.stderr)
        return 2
    args.wave = max(1, min(args.wave, 500))
    checkpoints = sorted({c for c in CHECKPOINTS if c <= args.callers} | {args.callers})

    with tempfile.TemporaryDirectory(prefix="many-callers-") as tmp:
        work = Path(tmp)
        with start_moto(work / "moto") as moto:
            state = work / "state"
            text = broker_config(
                listen="127.0.0.1:0",
                sts_endpoint=moto.endpoint,
                state_dir=state,
                rules=[Rule(APP, {"gid": SERVED_GID})],
            )
            # The rate limit is per caller; the connection cap must hold a whole wave.
            text = text.replace("[sts]", "[limits]\nmax_connections = 4096\n\n[sts]", 1)
            config = write_config(work / "imds-broker.toml", text)
            with serve_broker(work, config, binary=args.broker, rust_log="warn") as broker:
                host, port = broker.addresses[0].rsplit(":", 1)
                pid, admin = broker.proc.pid, state / "admin.sock"
                samples = [sample(pid, admin, "0")]
                totals = {"served": 0, "refused": 0, "error": 0}
                done, started = 0, time.monotonic()
                for mark in checkpoints[1:]:
                    while done < mark:
                        n = min(args.wave, mark - done)
                        for key, value in run_wave(host, int(port), done, n, args.served_every).items():
                            totals[key] += value
                        done += n
                    samples.append(sample(pid, admin, str(mark)))
                elapsed = time.monotonic() - started
                time.sleep(args.idle)
                # One more caller: its request is what runs the rate limiter's idle sweep.
                for key, value in run_wave(host, int(port), done, 1, args.served_every).items():
                    totals[key] += value
                samples.append(sample(pid, admin, f"idle {args.idle:g}s"))
                audit_bytes = (state / "audit.log").stat().st_size

    names = sorted({name for s in samples for name in s["maps"]})
    cols = ["callers", "RSS MiB", "fds", "threads", "conns", *names]
    print(" | ".join(cols))
    for s in samples:
        row = [
            s["at"],
            f"{s['rss_kib'] / 1024:.1f}",
            str(s["fds"]),
            str(s["threads"]),
            str(s["open_connections"]),
            *(str(s["maps"].get(name, "-")) for name in names),
        ]
        print(" | ".join(row))
    peak = max(s["rss_kib"] for s in samples)
    base, top, after = samples[0]["rss_kib"], samples[len(checkpoints) - 1]["rss_kib"], samples[-1]["rss_kib"]
    per_caller = (top - base) * 1024 / max(1, args.callers)
    print(
        f"{args.callers} callers in {elapsed:.1f} s ({totals}); RSS {base / 1024:.1f} -> {top / 1024:.1f} MiB "
        f"({per_caller:.0f} B per caller), peak {peak / 1024:.1f}, after idle {after / 1024:.1f} MiB; "
        f"audit file {audit_bytes / 1e6:.1f} MB"
    )
    print(
        json.dumps(
            {
                "bench": "many_callers",
                "broker": str(args.broker),
                "callers": args.callers,
                "wave": args.wave,
                "seconds": round(elapsed, 1),
                "outcomes": totals,
                "rss_bytes_per_caller": round(per_caller),
                "rss_returned_kib": top - after,
                "audit_bytes": audit_bytes,
                "samples": samples,
            }
        )
    )
    return 0 if totals["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
