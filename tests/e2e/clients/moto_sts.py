"""Run moto's server as a stand-in for STS on 127.0.0.1 and an OS-chosen port.

Prints `listening on 127.0.0.1:PORT` (the same handshake as imds-broker) once the
socket is bound, then serves until SIGTERM/SIGINT. Binding port 0 here, rather than
picking a free port in the test and passing it in, leaves no window for a clash.
"""

import signal
import sys
import threading

from moto.server import ThreadedMotoServer


def main() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address[:2]  # no public accessor for the bound port
    print(f"listening on {host}:{port}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
