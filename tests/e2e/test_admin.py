"""The admin listener of a running broker, as an operator uses it: /metrics parses with the
real Prometheus text parser and its counters move with what clients do; /healthz and
/readyz answer; `imds-broker status` prints each app's key id and expiry, never a secret."""

import re
import socket
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from harness import (
    APP_A,
    APP_B,
    BROKER_BIN,
    CLIENTS,
    ROLE_LISTING_PATH,
    UNMAPPED_UID,
    Callers,
    describe,
    issued_credentials,
    start_broker,
)

BOTO3 = next(c for c in CLIENTS if c.name == "boto3")


def admin_get(sock: Path, path: str) -> tuple[int, str]:
    """GET over the admin Unix socket (HTTP/1.0: the body ends at EOF)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


def samples(sock: Path) -> dict[tuple[str, frozenset], float]:
    status, body = admin_get(sock, "/metrics")
    assert status == 200, body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def test_metrics_health_and_status_of_a_running_broker(built, moto_sts, client_homes, tmp_path):
    workdir = tmp_path / "broker"
    with start_broker(workdir, sts_endpoint=moto_sts.endpoint) as broker:
        sock = workdir / "state" / "admin.sock"
        assert sock.stat().st_mode & 0o777 == 0o600
        callers = Callers(client_homes, sts_endpoint=moto_sts.endpoint, imds_endpoint=broker.endpoint)

        result = callers.whoami(BOTO3, APP_A.uid)
        assert result.returncode == 0, describe(result)
        callers.probe(UNMAPPED_UID, ROLE_LISTING_PATH)
        before = samples(sock)
        assert value(before, "imds_broker_credentials_served_total", app=APP_A.name) >= 1
        assert value(before, "imds_broker_denials_total", reason="no_rule") >= 1
        assert value(before, "imds_broker_sts_calls_total", outcome="ok", code="") == 1
        assert value(before, "imds_broker_sts_latency_seconds_count") == 1
        assert value(before, "imds_broker_credentials_expiry_seconds", app=APP_A.name) > 25 * 60
        assert value(before, "imds_broker_tokens_issued_total") >= 2
        assert value(before, "imds_broker_active_tokens") >= 2
        assert value(before, "imds_broker_cache_entries") == 1

        # One more credential request moves exactly the counters it should.
        _, creds = callers.probe(APP_A.uid, ROLE_LISTING_PATH + APP_A.name)
        assert creds["status"] == 200
        after = samples(sock)
        served = "imds_broker_credentials_served_total"
        assert value(after, served, app=APP_A.name) == value(before, served, app=APP_A.name) + 1
        requests = "imds_broker_requests_total"
        ok_creds = {"path": "credentials", "status": "200", "app": APP_A.name}
        assert value(after, requests, **ok_creds) == value(before, requests, **ok_creds) + 1
        assert value(after, "imds_broker_sts_calls_total", outcome="ok", code="") == 1, "served from cache"

        assert admin_get(sock, "/healthz") == (200, "ok\n")
        assert admin_get(sock, "/readyz") == (200, "ready\n")

        status = subprocess.run(
            [str(BROKER_BIN), "status", "--config", str(workdir / "imds-broker.toml")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, describe(status)
        rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
        key_id = re.search(r"\b(ASIA[A-Z0-9]{12,})\b", rows[APP_A.name])
        assert key_id and re.search(r"\b\d+m\d\ds\b", rows[APP_A.name]), status.stdout
        assert APP_B.role_arn in rows[APP_B.name] and "ASIA" not in rows[APP_B.name], status.stdout
        for cred in issued_credentials(moto_sts.endpoint):
            assert cred["secret_access_key"] not in status.stdout
            assert cred["session_token"] not in status.stdout
        assert key_id.group(1) in {c["access_key_id"] for c in issued_credentials(moto_sts.endpoint)}
