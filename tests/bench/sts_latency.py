"""What a cold first request costs an SDK when STS is slow or gone (issue 17, fault 4).
Numbers to read, not a test.

Usage, as root (boto3 runs as the app's uid), from anywhere:
    cargo build
    .venv/bin/python tests/bench/sts_latency.py [--broker target/debug/imds-broker]

moto plays STS behind a loopback relay that holds each request for a set time (0.5 s, 2 s,
30 s) or never answers (a black hole). For each, a fresh broker (cold cache) serves one app;
boto3 with its default IMDS settings (1 s timeout, one attempt) asks for its identity once
(cold), then again after STS has answered (cached). Prints each call's wall time and outcome.
Every wait is bounded; everything is stopped on exit.
"""

from __future__ import annotations

import argparse
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
    Callers,
    broker_config,
    serve_broker,
    start_moto,
    write_config,
)

BOTO3 = next(c for c in CLIENTS if c.name == "boto3")
HOLE = None  # never answer


class DelayingRelay:
    """127.0.0.1:PORT -> moto, each connection's first bytes held `delay` seconds (None: the
    connection is accepted and never answered)."""

    def __init__(self, target: tuple[str, int], delay: float | None):
        self.target, self.delay = target, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        if self.delay is HOLE:
            self.held.append(client)
            return
        time.sleep(self.delay)
        upstream = socket.create_connection(self.target, timeout=60)

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

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.server.close()
        for s in self.held:
            s.close()


def call(callers: Callers) -> tuple[float, str]:
    started = time.monotonic()
    result = callers.whoami(BOTO3, APP_A.uid)
    took = time.monotonic() - started
    if result.returncode == 0:
        return took, "ok"
    last = (result.stderr.strip().splitlines() or ["?"])[-1]
    return took, f"failed: {last[:90]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", type=Path, default=BROKER_BIN)
    args = parser.parse_args()
    homes = {}
    lines = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        home = tmp / "home"
        home.mkdir(mode=0o700)
        subprocess.run(["chown", f"{APP_A.uid}:{APP_A.uid}", str(home)], check=True)
        homes[APP_A.uid] = home
        moto = stack.enter_context(start_moto(tmp / "moto"))
        host, port = moto.endpoint.removeprefix("http://").split(":")
        for delay in (0.0, 0.5, 2.0, 30.0, HOLE):
            relay = DelayingRelay((host, int(port)), delay)
            label = "black hole" if delay is HOLE else f"{delay:g} s"
            work = tmp / f"broker-{label.replace(' ', '-')}"
            work.mkdir()
            path = write_config(
                work / "imds-broker.toml",
                broker_config(listen="127.0.0.1:0", sts_endpoint=f"http://127.0.0.1:{relay.port}", state_dir=work / "state"),
            )
            with serve_broker(work, path, binary=args.broker) as broker:
                callers = Callers(homes, sts_endpoint=moto.endpoint, imds_endpoint=broker.endpoint)
                cold = call(callers)
                # The fetch the first call started goes on; once it is done, the cache answers.
                if delay is not HOLE:
                    time.sleep(max(0.0, delay + 0.5 - cold[0]))
                warm = call(callers)
                lines.append(
                    f"STS {label:<10} cold: {cold[0]:6.2f} s {cold[1]:<40} then: {warm[0]:6.2f} s {warm[1]}"
                )
            relay.close()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
