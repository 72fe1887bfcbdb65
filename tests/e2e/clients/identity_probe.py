"""Raw IMDSv2 requests for the identity tests, one TCP connection per request.

Usage: identity_probe.py ENDPOINT [--bind IP [--source-port PORT]] [--token TOKEN]
                         [--put-header 'Name: value']... [--get-header 'Name: value']...
                         [PATH...]

Without --token, first PUTs /latest/api/token (TTL 21600, plus the --put-header
headers); then GETs each PATH with the token and the --get-header headers (no GETs if
the PUT was refused). Every request uses a fresh connection, because the broker
identifies the caller once per connection, and reports that connection's local address,
which is the `peer` of the broker's audit event for it. With --source-port, every request
goes on one keep-alive connection from that port instead (a port can only be reused once
the previous connection's TIME_WAIT is over).

Prints one JSON object: {"pid", "token": PUT response or null, "responses": [...]},
each response {"method", "path", "status", "headers": [[name, value]...], "body", "local"}.
"""

import argparse
import http.client
import json
import os
import sys
from urllib.parse import urlsplit

TIMEOUT_SECONDS = 10
TOKEN_TTL = "21600"
TOKEN_PATH = "/latest/api/token"


def request(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]) -> dict:
    """One request on `conn` (connected here unless it already is); the response as a dict."""
    if conn.sock is None:
        conn.connect()
    local_ip, local_port = conn.sock.getsockname()[:2]
    conn.request(method, path, headers=headers)  # a Host in `headers` replaces the default one
    response = conn.getresponse()
    return {
        "method": method,
        "path": path,
        "status": response.status,
        "headers": response.getheaders(),
        "body": response.read().decode("utf-8", errors="replace"),
        "local": f"{local_ip}:{local_port}",
    }


def connection(endpoint: str, bind: str | None, port: int = 0) -> http.client.HTTPConnection:
    url = urlsplit(endpoint)
    source = (bind, port) if bind else None
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=TIMEOUT_SECONDS, source_address=source)


def fresh_request(endpoint: str, bind: str | None, method: str, path: str, headers: dict[str, str]) -> dict:
    conn = connection(endpoint, bind)
    try:
        return request(conn, method, path, headers)
    finally:
        conn.close()


def header_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--bind")
    parser.add_argument("--source-port", type=int)
    parser.add_argument("--token")
    parser.add_argument("--put-header", type=header_pair, action="append", default=[])
    parser.add_argument("--get-header", type=header_pair, action="append", default=[])
    args = parser.parse_intermixed_args()

    report = {"pid": os.getpid(), "token": None, "responses": []}
    if args.source_port is not None:
        one = connection(args.endpoint, args.bind, args.source_port)
        send = lambda method, path, headers: request(one, method, path, headers)  # noqa: E731
    else:
        send = lambda method, path, headers: fresh_request(args.endpoint, args.bind, method, path, headers)  # noqa: E731
    token = args.token
    if token is None:
        headers = {"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL, **dict(args.put_header)}
        report["token"] = send("PUT", TOKEN_PATH, headers)
        if report["token"]["status"] == 200:
            token = report["token"]["body"]
    if token is not None:
        headers = {"X-aws-ec2-metadata-token": token, **dict(args.get_header)}
        for path in args.paths:
            report["responses"].append(send("GET", path, headers))
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
