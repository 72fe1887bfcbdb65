"""Talk to the broker over a TCP connection that another process holds too.

Usage: shared_socket.py ENDPOINT (--inherit HOLDER_EXE | --send-to UNIX_PATH) [--warm] PATH...

Creates the TCP socket unconnected and first hands it to the other process: a child
running `HOLDER_EXE fd_holder.py` inherits it, or a running `fd_holder.py --receive
UNIX_PATH` gets it over that unix socket. Only once the other process holds it does this
one connect, then PUT a token and GET each PATH with it, all on that one connection: when
the broker looks for the connection's owner, two processes hold it. With --warm it first
gets a token on a connection of its own, as a client that used the broker before would.

Prints {"pid", "holder_pid", "local", "warm": PUT response or null,
"responses": [PUT, GET...]} (responses as identity_probe.py reports them).
"""

import argparse
import http.client
import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from identity_probe import TIMEOUT_SECONDS, TOKEN_PATH, TOKEN_TTL, fresh_request, request

FD_HOLDER = Path(__file__).resolve().with_name("fd_holder.py")
TTL_HEADER = {"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL}


def give_to_child(sock: socket.socket, holder_exe: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [holder_exe, str(FD_HOLDER)], pass_fds=[sock.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    ready, _, _ = select.select([child.stdout], [], [], TIMEOUT_SECONDS)
    if not ready or child.stdout.readline() != "ready\n":
        child.kill()
        sys.exit("the holder child did not start")
    return child


def give_to_holder(sock: socket.socket, unix_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.settimeout(TIMEOUT_SECONDS)
        unix.connect(unix_path)
        socket.send_fds(unix, [b"fd"], [sock.fileno()])
        if unix.recv(2) != b"ok":
            sys.exit("the holder did not take the socket")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("paths", nargs="+")
    other = parser.add_mutually_exclusive_group(required=True)
    other.add_argument("--inherit", metavar="HOLDER_EXE")
    other.add_argument("--send-to", metavar="UNIX_PATH")
    parser.add_argument("--warm", action="store_true")
    args = parser.parse_intermixed_args()
    url = urlsplit(args.endpoint)

    report = {"pid": os.getpid(), "holder_pid": None, "local": None, "warm": None, "responses": []}
    if args.warm:
        report["warm"] = fresh_request(args.endpoint, None, "PUT", TOKEN_PATH, TTL_HEADER)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    child = None
    try:
        if args.inherit:
            child = give_to_child(sock, args.inherit)
            report["holder_pid"] = child.pid
        else:
            give_to_holder(sock, args.send_to)
        sock.settimeout(TIMEOUT_SECONDS)
        sock.connect((url.hostname, url.port))
        report["local"] = "%s:%d" % sock.getsockname()[:2]
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_SECONDS)
        conn.sock = sock
        put = request(conn, "PUT", TOKEN_PATH, TTL_HEADER)
        report["responses"].append(put)
        for path in args.paths if put["status"] == 200 else ():
            if conn.sock is not sock:  # http.client would quietly open a new, unshared one
                sys.exit(f"the broker closed the shared connection; responses so far: {report['responses']}")
            report["responses"].append(request(conn, "GET", path, {"X-aws-ec2-metadata-token": put["body"]}))
    finally:
        if child is not None:
            child.stdin.close()
            child.wait(TIMEOUT_SECONDS)
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
