"""What identifying a caller in a container costs, and whether it grows with the number of
containers on the host (issue 14's benchmark). Numbers to read, not a test.

Usage, as root, from anywhere (podman, runc and the CNI plugins installed, as .ci/run does):
    cargo build --release
    .venv/bin/python tests/bench/containers.py --broker target/release/imds-broker [--others 200]

The layout is tests/e2e/containers.py's: a "host" network namespace with the CNI bridge,
169.254.169.254, moto and podman's API service; the broker (release build) with `[containers]`
and a `container_label` rule, so every caller is found in its own network namespace and
described by the runtime. A client inside a container opens a new connection and does a
token PUT, timing connect() to the end of the response (identification happens at accept,
before the request is read, so it is inside that time).

Rounds, each with 0 and then `--others` idle containers running beside it:
  - `known`: one container, REQUESTS new connections in a row (its namespace is indexed and
    the runtime's answer cached after the first);
  - `first`: FRESH new containers, one first connection each (the namespace index refreshed
    for an address it does not hold yet, and the runtime asked about the container).
Prints p50/p99/max per round. Every loop is bounded; everything is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from containers import (  # noqa: E402  (after the path set-up above)
    IMDS_ADDRESS,
    ContainerHost,
    assert_imds_is_local,
    container_host,
)
from harness import BROKER_BIN, CLIENT_UIDS, PYTHON, REGION, serve_broker, write_config  # noqa: E402

LABEL = "com.example.app"
REQUESTS = 2000
FRESH = 30

CLIENT = r"""
import json, socket, sys, time
n = int(sys.argv[1])
request = (b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
out = []
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection(("169.254.169.254", 80), timeout=10)
    s.sendall(request)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    out.append((time.perf_counter() - t0) * 1e6)
    assert data.startswith(b"HTTP/1.1 200"), data[:100]
print(json.dumps(out))
"""


def config(host: ContainerHost, state_dir: Path, rule: str) -> str:
    match = (
        f'{{ container_label = {{ "{LABEL}" = "billing" }} }}'
        if rule == "label"
        else '{ cgroup = "/libpod_parent/libpod-*" }'
    )
    return f"""\
[server]
listen = ["{IMDS_ADDRESS}:80"]
state_dir = "{state_dir}"

[sts]
region = "{REGION}"
endpoint_url = "{host.sts_endpoint}"

[limits]
requests_per_second = 100000
burst = 100000

[containers]
runtime_socket = "{host.runtime.socket}"

[[app]]
name = "billing"
role_arn = "arn:aws:iam::111122223333:role/billing"
match = {match}
"""


def timings(container, n: int) -> list[float]:
    result = container.exec([str(PYTHON), "-c", CLIENT, str(n)], uid=CLIENT_UIDS[0])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{name:<28} n={len(samples):<5} p50={statistics.median(ordered) / 1000:.3f} ms "
        f"p99={p99 / 1000:.3f} ms max={ordered[-1] / 1000:.3f} ms"
    )


def rounds(host: ContainerHost, label: str) -> list[str]:
    known = host.run(labels={LABEL: "billing"})
    samples = timings(known, REQUESTS + 1)[1:]
    lines = [summary(f"known ({label})", samples)]
    first = []
    for _ in range(FRESH):
        fresh = host.run(labels={LABEL: "billing"})
        first.extend(timings(fresh, 1))
        fresh.remove()
    lines.append(summary(f"first ({label})", first))
    known.remove()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", type=Path, default=BROKER_BIN)
    parser.add_argument("--others", type=int, default=200)
    parser.add_argument(
        "--rule",
        choices=("label", "cgroup"),
        default="label",
        help="label: the runtime is asked about each container; cgroup: it never is",
    )
    args = parser.parse_args()
    report = []
    with ExitStack() as stack:
        host = stack.enter_context(container_host(CLIENT_UIDS))
        workdir = Path(stack.enter_context(__import__("tempfile").TemporaryDirectory()))
        path = write_config(workdir / "imds-broker.toml", config(host, workdir / "state", args.rule))
        assert_imds_is_local(host.netns)
        stack.enter_context(
            serve_broker(workdir, path, launcher=["nsenter", f"--net=/run/netns/{host.netns}", "--"], binary=args.broker)
        )
        report += rounds(host, "0 others")
        started = time.monotonic()
        for i in range(args.others):
            host.run(labels={LABEL: f"idle-{i}"})
        report.append(f"started {args.others} idle containers in {time.monotonic() - started:.0f} s")
        report += rounds(host, f"{args.others} others")
    print("\n".join(report))


if __name__ == "__main__":
    main()
