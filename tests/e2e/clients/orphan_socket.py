"""Leave a request to the broker on a connection that no process holds.

Usage: orphan_socket.py ENDPOINT TOKEN UNIX_FD PATH

Connects, sends `GET PATH` with TOKEN (and `Connection: close`), then sends the socket
over the inherited unix socket UNIX_FD (SCM_RIGHTS) and exits with nobody having
received it: from then on the connection lives only as a message in flight, in no
process's fd table. The test collects the broker's answer once it has decided.
Prints {"pid", "local"}.
"""

import json
import os
import socket
import sys
from urllib.parse import urlsplit

TIMEOUT_SECONDS = 10


def main() -> int:
    endpoint, token, unix_fd, path = sys.argv[1:]
    url = urlsplit(endpoint)
    sock = socket.create_connection((url.hostname, url.port), timeout=TIMEOUT_SECONDS)
    local = "%s:%d" % sock.getsockname()[:2]
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nX-aws-ec2-metadata-token: {token}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    with socket.socket(fileno=int(unix_fd)) as unix:
        socket.send_fds(unix, [b"fd"], [sock.fileno()])
    json.dump({"pid": os.getpid(), "local": local}, sys.stdout)
    return 0  # exiting closes our descriptor; the one in flight keeps the connection open


if __name__ == "__main__":
    sys.exit(main())
