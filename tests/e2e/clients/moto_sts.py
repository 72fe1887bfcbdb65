"""Run moto's server as a stand-in for STS on an OS-chosen port.

Usage: moto_sts.py [ADDRESS]   (default 127.0.0.1; another address for callers that cannot
reach this host's loopback, e.g. containers reaching it through their bridge's gateway)

Prints `listening on ADDRESS:PORT` (the same handshake as imds-broker) once the socket is
bound, then serves until SIGTERM/SIGINT. Binding port 0 here, rather than picking a free port
in the test and passing it in, leaves no window for a clash.
"""

import signal
import sys
import threading

from moto.server import ThreadedMotoServer


def main() -> None:
    (address,) = sys.argv[1:] or ["127.0.0.1"]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    server = ThreadedMotoServer(ip_address=address, port=0, verbose=False)
    server.start()
    host, port = server._server.server_address[:2]  # no public accessor for the bound port
    print(f"listening on {host}:{port}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
