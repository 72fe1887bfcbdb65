"""Raw IMDSv2 exchange with http.client, for checks no SDK would surface.

Usage: imds_probe.py ENDPOINT TTL PATH...

Does `PUT /latest/api/token` with the given TTL, then GETs each PATH with that token,
and prints one JSON list to stdout: the token response first, then one entry per
PATH, each `{"method", "path", "status", "headers": [[name, value], ...], "body", "local"}`.
Run as the uid under test: the broker decides what to answer from the peer's uid,
so the assertions live in the test, not here.
"""

import json
import sys

from identity_probe import fresh_request  # one connection per request, beside this file


def main() -> int:
    endpoint, ttl, *paths = sys.argv[1:]
    token = fresh_request(endpoint, None, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
    results = [token]
    for path in paths:
        results.append(fresh_request(endpoint, None, "GET", path, {"X-aws-ec2-metadata-token": token["body"]}))
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
