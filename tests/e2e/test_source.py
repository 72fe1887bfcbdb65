"""The daemon's own credentials from IAM Roles Anywhere (`[source] kind = "roles_anywhere"`),
end to end and with no AWS key anywhere in its environment: it signs CreateSession with a
test certificate, a loopback Roles Anywhere stand-in verifies the signature as AWS does
(clients/rolesanywhere_server.py, itself checked against AWS's Python signer) and answers with
moto's credentials, and an app's SDK gets its own role through IMDS. Then what an operator
lives with: a renewed certificate picked up on SIGHUP, a broken one refused with the old kept,
an expired one failing /readyz, a private key others can read refused at start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

from test_admin import admin_get
from harness import (
    ACCOUNT_ID,
    APP_A,
    BROKER_BIN,
    CLIENTS,
    CLIENTS_DIR,
    MAPPED_APPS,
    PYTHON,
    REGION,
    AuditFile,
    Callers,
    describe,
    hermetic_env,
    serving,
    start_moto,
    write_config,
)

BOTO3 = next(c for c in CLIENTS if c.name == "boto3")
TRUST_ANCHOR_ARN = f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT_ID}:trust-anchor/0a1b2c3d-0000-4000-8000-000000000001"
PROFILE_ARN = f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT_ID}:profile/0a1b2c3d-0000-4000-8000-000000000002"
SOURCE_ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/imds-broker-source"
CERTS = CLIENTS_DIR / "rolesanywhere_certs.py"


def certs(*args: str) -> dict:
    result = subprocess.run([str(PYTHON), str(CERTS), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout) if result.stdout.strip() else {}


def leaf(ca: Path, out: Path, name: str, *extra: str) -> dict:
    return certs("leaf", str(ca), str(out), name, "--key", "p256", *extra)


def config(workdir: Path, moto: str, verifier: str) -> Path:
    apps = "".join(
        f'[[app]]\nname = "{app.name}"\nrole_arn = "{app.role_arn}"\nmatch = {{ uid = {app.uid} }}\n'
        for app in MAPPED_APPS
    )
    return write_config(
        workdir / "imds-broker.toml",
        f"""\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{workdir / "state"}"

[sts]
region = "{REGION}"
endpoint_url = "{moto}"

[source]
kind = "roles_anywhere"
certificate = "{workdir / "host.pem"}"
private_key = "{workdir / "host.key"}"
trust_anchor_arn = "{TRUST_ANCHOR_ARN}"
profile_arn = "{PROFILE_ARN}"
role_arn = "{SOURCE_ROLE_ARN}"
duration = "1h"
endpoint_url = "{verifier}"
{apps}""",
    )


def broker_env() -> dict[str, str]:
    # No key, no profile, no IMDS: the certificate is the daemon's only way in.
    env = hermetic_env(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        RUST_LOG="info",
    )
    assert not any(k.startswith("AWS_ACCESS") or k.startswith("AWS_SECRET") for k in env)
    return env


@contextmanager
def roles_anywhere_lab(tmp_path: Path, leaf_args: tuple[str, ...] = ()):
    """moto, the verifier trusting a test CA, a leaf certificate at host.pem/host.key, and the
    broker's config: yields (workdir, ca, moto, verifier, config path, leaf info)."""
    ca = tmp_path / "ca"
    certs("ca", str(ca))
    issued = leaf(ca, tmp_path, "host", *leaf_args)
    with ExitStack() as stack:
        moto = stack.enter_context(start_moto(tmp_path / "moto"))
        verifier = stack.enter_context(
            serving(
                "rolesanywhere",
                [
                    str(PYTHON), str(CLIENTS_DIR / "rolesanywhere_server.py"),
                    "--trust-anchor", str(ca / "ca.pem"),
                    "--trust-anchor-arn", TRUST_ANCHOR_ARN,
                    "--profile-arn", PROFILE_ARN,
                    "--role-arn", SOURCE_ROLE_ARN,
                    "--region", REGION,
                    "--sts-endpoint", moto.endpoint,
                ],
                hermetic_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"),
                tmp_path / "verifier",
            )
        )  # fmt: skip
        yield tmp_path, ca, moto, verifier, config(tmp_path, moto.endpoint, verifier.endpoint), issued


def serve(workdir: Path, path: Path):
    return serving("imds-broker", [str(BROKER_BIN), "serve", "--config", str(path)], broker_env(), workdir)


def status(path: Path) -> str:
    result = subprocess.run([str(BROKER_BIN), "status", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, describe(result)
    return result.stdout


def seen_serials(verifier) -> list[dict]:
    with urllib.request.urlopen(f"{verifier.endpoint}/verifier/log", timeout=10) as response:
        return json.loads(response.read())


def test_an_app_gets_its_role_with_only_a_certificate_as_the_daemons_source(built, client_homes, tmp_path):
    with roles_anywhere_lab(tmp_path) as (workdir, ca, moto, verifier, path, issued):
        with serve(workdir, path) as broker:
            callers = Callers(client_homes, sts_endpoint=moto.endpoint, imds_endpoint=broker.endpoint)
            result = callers.whoami(BOTO3, APP_A.uid)

            assert result.returncode == 0, describe(result)
            assert re.fullmatch(APP_A.assumed_role_arn_re, result.stdout.strip()), describe(result)
            # The daemon's own session came from the verifier, signed by this certificate.
            log = seen_serials(verifier)
            assert {"serial": issued["serial"], "ok": True} in [{k: e[k] for k in ("serial", "ok")} for e in log], log
            out = status(path)
            assert f"source: roles_anywhere, certificate serial {issued['serial']}" in out, out
            assert "days left" in out, out


def test_a_renewed_certificate_is_used_and_a_broken_one_refused(built, tmp_path):
    with roles_anywhere_lab(tmp_path) as (workdir, ca, moto, verifier, path, issued):
        audit = AuditFile(workdir / "state" / "audit.log")
        with serve(workdir, path) as broker:
            # certbot renews in place: new certificate and key over the old files.
            renewed = leaf(ca, workdir, "renewed")
            shutil.copyfile(workdir / "renewed.pem", workdir / "host.pem")
            shutil.copyfile(workdir / "renewed.key", workdir / "host.key")
            os.chmod(workdir / "host.key", 0o600)
            mark = audit.mark()
            broker.proc.send_signal(signal.SIGHUP)
            audit.wait_for(mark, event="source.certificate_reloaded", serial=renewed["serial"])
            assert f"certificate serial {renewed['serial']}" in status(path)

            # A key that is not the certificate's: refused, the renewed pair stays.
            leaf(ca, workdir, "other")
            shutil.copyfile(workdir / "other.key", workdir / "host.key")
            os.chmod(workdir / "host.key", 0o600)
            mark = audit.mark()
            broker.proc.send_signal(signal.SIGHUP)
            rejected = audit.wait_for(mark, event="source.certificate_rejected")
            assert "does not belong to the certificate" in rejected["error"], rejected
            assert f"certificate serial {renewed['serial']}" in status(path)
            assert "PRIVATE KEY" not in broker.stderr_text()


def test_an_expired_certificate_fails_readiness(built, tmp_path):
    with roles_anywhere_lab(tmp_path, ("--expired",)) as (workdir, ca, moto, verifier, path, issued):
        with serve(workdir, path):
            code, body = admin_get(workdir / "state" / "admin.sock", "/readyz")
            assert code == 503, body
            assert "source certificate expired" in body, body
            assert "EXPIRED" in status(path)


def test_a_private_key_others_can_read_is_refused(built, tmp_path):
    with roles_anywhere_lab(tmp_path) as (workdir, ca, moto, verifier, path, issued):
        os.chmod(workdir / "host.key", 0o644)
        check = subprocess.run([str(BROKER_BIN), "check", "--config", str(path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 1, describe(check)
        assert "host.key" in check.stderr and "644" in check.stderr, check.stderr
        served = subprocess.run(
            [str(BROKER_BIN), "serve", "--config", str(path)], env=broker_env(), capture_output=True, text=True, timeout=30
        )
        assert served.returncode == 64, describe(served)
        assert "host.key" in served.stderr, served.stderr
