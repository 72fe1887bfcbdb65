"""Raw IMDSv2 exchange with http.client, for checks no SDK would surface.

Usage: imds_probe.py ENDPOINT TTL PATH...

Does `PUT /latest/api/token` with the given TTL, then GETs each PATH with that token,
and prints one JSON list to stdout: the token response first, then one entry per
PATH, each `{"method", "path", "status", "headers": [[name, value], ...], "body"}`.
Run as the uid under test: the broker decides what to answer from the peer's uid,
so the assertions live in the test, not here.
"""

import http.client
import json
import sys
from urllib.parse import urlsplit

TIMEOUT_SECONDS = 10


def request(endpoint: str, method: str, path: str, headers: dict[str, str]) -> dict:
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=TIMEOUT_SECONDS)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return {
            "method": method,
            "path": path,
            "status": response.status,
            "headers": response.getheaders(),
            "body": response.read().decode("utf-8", errors="replace"),
        }
    finally:
        conn.close()


def main() -> int:
    endpoint, ttl, *paths = sys.argv[1:]
    token = request(endpoint, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
    results = [token]
    for path in paths:
        results.append(request(endpoint, "GET", path, {"X-aws-ec2-metadata-token": token["body"]}))
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
