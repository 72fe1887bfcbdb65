"""Run moto's server as a stand-in for STS on a given address and an OS-chosen port.

Usage: moto_sts_at.py ADDRESS

Like moto_sts.py (which stays on 127.0.0.1), for callers that cannot reach the
server's loopback, e.g. containers reaching it through their bridge's gateway. Prints
`listening on ADDRESS:PORT` once the socket is bound, then serves until SIGTERM/SIGINT.
"""

import signal
import sys
import threading

from moto.server import ThreadedMotoServer


def main() -> None:
    (address,) = sys.argv[1:]
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
