"""The second holder of a shared socket (see shared_socket.py).

Usage: fd_holder.py [--receive UNIX_PATH]

Without arguments it holds whatever file descriptors it inherited. With --receive it
listens on UNIX_PATH (mode 0666, so a client of another uid may connect), accepts one
connection, and keeps the file descriptors passed over it (SCM_RIGHTS), answering `ok`.
Prints `ready` once it holds its inherited descriptors or listens, then holds everything
until stdin closes.
"""

import argparse
import os
import socket
import sys

TIMEOUT_SECONDS = 60
MAX_FDS = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--receive", metavar="UNIX_PATH")
    args = parser.parse_args()

    held = []
    if args.receive:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(args.receive)
        os.chmod(args.receive, 0o666)
        server.listen(1)
        server.settimeout(TIMEOUT_SECONDS)
        print("ready", flush=True)
        conn, _ = server.accept()
        _, fds, _, _ = socket.recv_fds(conn, 16, MAX_FDS)
        held.extend(fds)  # open in this process's fd table from now on
        conn.sendall(b"ok")
    else:
        print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
