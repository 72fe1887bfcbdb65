#!/usr/bin/env python3
"""A plain IMDSv2 client for the kill campaign, run as an app's uid (the broker tells callers
apart by the uid that owns the socket). Standard library only.

  imds_client.py hammer ENDPOINT_FILE
      Until stdin closes: read the endpoint (`HOST:PORT`) from ENDPOINT_FILE, PUT a token,
      print `token TOKEN`, then ask for the role listing and the credentials with it a few
      times on one keep-alive connection, printing `ok N` after each round. A refused
      connection (the daemon was killed) is retried after a short pause.
  imds_client.py check ENDPOINT TOKEN...
      For each token issued earlier, GET the listing and the credentials with it; prints one
      JSON list of {"listing", "role", "credentials"} (statuses and the role name).
  imds_client.py probe ENDPOINT
      A new token, then the listing; prints {"token": status, "listing": status, "body": ...}.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
from pathlib import Path

TTL = "21600"  # what botocore, JS and Rust ask for
LISTING = "/latest/meta-data/iam/security-credentials/"
TIMEOUT_S = 5
ROUNDS = 4  # listing + credentials pairs per token
RETRY_PAUSE_S = 0.02


def request(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    return response.status, response.read().decode(errors="replace")


def connect(endpoint: str) -> http.client.HTTPConnection:
    host, port = endpoint.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)


def token(conn: http.client.HTTPConnection) -> tuple[int, str]:
    return request(conn, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": TTL})


def hammer(endpoint_file: Path) -> int:
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the campaign is done with this client
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    done = 0
    while not stop.is_set():
        try:
            conn = connect(endpoint_file.read_text().strip())
            status, tok = token(conn)
            if status != 200:
                print(f"error token {status}", flush=True)
                stop.wait(RETRY_PAUSE_S)
                continue
            print(f"token {tok}", flush=True)
            for _ in range(ROUNDS):
                header = {"X-aws-ec2-metadata-token": tok}
                status, role = request(conn, "GET", LISTING, header)
                if status == 200:
                    status, _ = request(conn, "GET", LISTING + role.strip(), header)
                if status != 200:
                    print(f"error get {status}", flush=True)
                    break
                done += 1
                print(f"ok {done}", flush=True)
            conn.close()
        except (OSError, http.client.HTTPException, ValueError):
            # Killed daemon, or the endpoint file being rewritten: try again shortly.
            stop.wait(RETRY_PAUSE_S)
    return 0


def check(endpoint: str, tokens: list[str]) -> int:
    results = []
    for tok in tokens:
        conn = connect(endpoint)
        header = {"X-aws-ec2-metadata-token": tok}
        listing, role = request(conn, "GET", LISTING, header)
        creds = None
        if listing == 200:
            creds, body = request(conn, "GET", LISTING + role.strip(), header)
            if creds == 200 and "AccessKeyId" not in body:
                creds = -1  # a 200 without credentials in it
        conn.close()
        results.append({"listing": listing, "role": role.strip() if listing == 200 else None, "credentials": creds})
    json.dump(results, sys.stdout)
    return 0


def probe(endpoint: str) -> int:
    conn = connect(endpoint)
    status, tok = token(conn)
    result = {"token": status, "listing": None, "body": None}
    if status == 200:
        result["listing"], body = request(conn, "GET", LISTING, {"X-aws-ec2-metadata-token": tok})
        result["body"] = body.strip()[:200]
    conn.close()
    json.dump(result, sys.stdout)
    return 0


def main() -> int:
    mode, *args = sys.argv[1:]
    if mode == "hammer":
        return hammer(Path(args[0]))
    if mode == "check":
        return check(args[0], args[1:])
    if mode == "probe":
        return probe(args[0])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
