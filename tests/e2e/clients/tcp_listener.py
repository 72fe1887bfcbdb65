"""A bystander that listens on a TCP port on every address, as many services do.

Usage: tcp_listener.py

Listens on 0.0.0.0 (an ephemeral port), prints the port, and holds the socket until stdin
closes. It never accepts: the identity tests only need its port to exist.
"""

import socket
import sys


def main() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("0.0.0.0", 0))
    server.listen(1)
    print(server.getsockname()[1], flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
