"""What a cold first request costs each SDK when STS is slow or gone (issue 17, fault 4).
Numbers to read, not a test.

Usage, as root (clients run as the app's uid, in a network namespace the script makes):
    cargo build --release --bins --examples
    .venv/bin/python tests/bench/sts_latency.py --broker target/release/imds-broker
        [--rust-client target/release/examples/sdk_whoami] [--clients boto3,awscli,js,rust]

Everything runs in a fresh network namespace (as tests/e2e/test_netns.py does): moto plays STS
on the namespace's loopback behind a relay that holds each connection for a set time (0.5 s,
2 s, 30 s) before passing it on, accepts it and never answers ("no answer"), or never completes
the handshake (its accept queue is full: "no connect"); the broker listens on
169.254.169.254:80, an address the namespace alone holds, and each client (boto3, the aws CLI,
the JS SDK v3, aws-sdk-rust) runs there with its default IMDS settings and no endpoint
configured. For each STS behaviour and client a fresh broker (cold cache) serves the app; the
client asks for its identity once (cold), at once again (the SDK's next try), and once more
after STS has answered, or after an attempt would have timed out. Prints each call's wall time
(process start included: compare with the `0 s` row) and outcome. Every wait is bounded and
everything is stopped on exit.

The relay runs as a child in the namespace: `sts_latency.py relay HOST:PORT DELAY|hole|noconnect`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (  # noqa: E402  (after the path set-up above)
    APP_A,
    BROKER_BIN,
    CLIENTS,
    PYTHON,
    Callers,
    add_link_local_address,
    broker_config,
    hermetic_env,
    netns_exec,
    network_namespace,
    serve_broker,
    serving,
    start_moto,
    write_config,
)

IMDS_ADDRESS = "169.254.169.254"
# The broker's own bound on one AssumeRole attempt (STS_ATTEMPT_TIMEOUT).
ATTEMPT_TIMEOUT_S = 10.0
HOLE = "hole"  # accepted, never answered
NO_CONNECT = "noconnect"  # the handshake never completes
BEHAVIOURS: tuple[float | str, ...] = (0.0, 0.5, 2.0, 30.0, HOLE, NO_CONNECT)


# --------------------------------------------------------------------------- the relay (child)


def relay(target: tuple[str, int], behaviour: str) -> None:
    """Serve 127.0.0.1:PORT -> target until SIGTERM, printing `listening on` first."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if behaviour == NO_CONNECT:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        address = server.getsockname()
        fillers = []
        for _ in range(8):  # a backlog of 0 holds one or two; then SYNs are dropped
            try:
                fillers.append(socket.create_connection(address, timeout=0.5))
            except TimeoutError:
                break
        else:
            sys.exit("the accept queue never filled up")
        print(f"listening on {address[0]}:{address[1]}", flush=True)
        stop.wait()
        return
    delay = None if behaviour == HOLE else float(behaviour)
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def serve(client: socket.socket) -> None:
        if delay is None:
            held.append(client)
            return
        time.sleep(delay)
        upstream = socket.create_connection(target, timeout=60)
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    host, port = server.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop.wait()


# --------------------------------------------------------------------------- the bench


def call(callers: Callers, client) -> tuple[float, str]:
    started = time.monotonic()
    result = callers.whoami(client, APP_A.uid)
    took = time.monotonic() - started
    if result.returncode == 0:
        return took, "ok"
    if re.search(client.no_credentials_re, result.stderr, re.MULTILINE):
        return took, "no credentials"
    last = (result.stderr.strip().splitlines() or ["?"])[-1]
    return took, f"failed: {last[:60]}"


def label(behaviour: float | str) -> str:
    if isinstance(behaviour, float):
        return f"{behaviour:g} s"
    return {HOLE: "no answer", NO_CONNECT: "no connect"}[behaviour]


def later_after(behaviour: float | str) -> float:
    """When, after the cold call began, STS has answered (or the attempt has timed out)."""
    if isinstance(behaviour, float) and behaviour < ATTEMPT_TIMEOUT_S:
        return behaviour + 0.5
    return ATTEMPT_TIMEOUT_S + 1.0


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "relay":
        host, port = sys.argv[2].rsplit(":", 1)
        relay((host, int(port)), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", type=Path, default=BROKER_BIN)
    parser.add_argument("--rust-client", type=Path, help="default: examples/sdk_whoami beside --broker")
    parser.add_argument("--clients", default=",".join(c.name for c in CLIENTS))
    args = parser.parse_args()
    rust_client = args.rust_client or args.broker.resolve().parent / "examples" / "sdk_whoami"
    clients = []
    for name in args.clients.split(","):
        client = next(c for c in CLIENTS if c.name == name)
        if name == "rust":
            client = dataclasses.replace(client, argv=(str(rust_client),))
        clients.append(client)
    rows = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        home = tmp / "home"
        home.mkdir(mode=0o700)
        subprocess.run(["chown", f"{APP_A.uid}:{APP_A.uid}", str(home)], check=True)
        tmp.chmod(0o755)  # the client's home is inside
        netns = stack.enter_context(network_namespace("imdsb-bench"))
        add_link_local_address(netns, IMDS_ADDRESS)
        moto = stack.enter_context(start_moto(tmp / "moto", netns=netns))
        callers = Callers({APP_A.uid: home}, sts_endpoint=moto.endpoint, imds_endpoint=None, netns=netns)
        # moto builds its STS backend on its first request (a second or more on a busy host):
        # done once here, untimed, so that the first row does not measure moto's start-up.
        warm = tmp / "broker-warm-up"
        warm.mkdir()
        config = write_config(
            warm / "imds-broker.toml",
            broker_config(listen=f"{IMDS_ADDRESS}:80", sts_endpoint=moto.endpoint, state_dir=warm / "state"),
        )
        with serve_broker(warm, config, launcher=netns_exec(netns), binary=args.broker):
            for _ in range(3):
                if call(callers, clients[0])[1] == "ok":
                    break
                time.sleep(2)
        for behaviour in BEHAVIOURS:
            argv = [*netns_exec(netns), str(PYTHON), str(Path(__file__).resolve()), "relay"]
            argv += [moto.endpoint.removeprefix("http://"), str(behaviour)]
            with serving(f"relay-{label(behaviour).replace(' ', '-')}", argv, hermetic_env(), tmp) as sts:
                for client in clients:
                    work = tmp / f"broker-{label(behaviour).replace(' ', '-')}-{client.name}"
                    work.mkdir()
                    config = write_config(
                        work / "imds-broker.toml",
                        broker_config(listen=f"{IMDS_ADDRESS}:80", sts_endpoint=sts.endpoint, state_dir=work / "state"),
                    )
                    with serve_broker(work, config, launcher=netns_exec(netns), binary=args.broker):
                        began = time.monotonic()
                        cold = call(callers, client)
                        again = call(callers, client)
                        time.sleep(max(0.0, began + later_after(behaviour) - time.monotonic()))
                        later = call(callers, client)
                    rows.append((label(behaviour), client.name, cold, again, later))
                    print(format_row(rows[-1]), flush=True)
    print()
    print(f"{'STS':<10} {'client':<7} {'cold':>7} {'':<16} {'again':>7} {'':<16} {'later':>7}")
    for row in rows:
        print(format_row(row))


def format_row(row) -> str:
    behaviour, client, *calls = row
    cells = " ".join(f"{took:6.2f}s {outcome:<16}" for took, outcome in calls)
    return f"{behaviour:<10} {client:<7} {cells}"


if __name__ == "__main__":
    main()
