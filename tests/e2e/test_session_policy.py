"""Session policies end to end: an app whose `[[app]]` names the seed
deploy/policies/s3-prefix-readwrite.json (only `client-a/uploads/*` of `example-bucket`)
gets credentials from the broker through boto3's default chain and writes to S3 on moto.

What moto can and cannot verify (moto 5.x, checked in its source: `AssumedRoleAccessKey.
collect_policies` reads only the role's own policies, and `AssumeRole` ignores `PolicyArns`):
- it records the `Policy` each AssumeRole carried (`/moto-api/data.json`), so the test checks
  that the broker sent exactly the minified seed for this app and none for an app without one;
- it does NOT enforce session policies on S3 requests, even with IAM authorization on, so a
  write outside the prefix succeeds there. The denial side is checked with the broker's own
  evaluator (`imds-broker explain --app`) on the very requests the client made, and a canary
  assertion fails the day moto starts enforcing, so the test can then assert the AccessDenied.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from harness import (
    ACCOUNT_ID,
    BROKER_BIN,
    PYTHON,
    REGION,
    REPO_ROOT,
    Rule,
    Server,
    broker_config,
    client_env,
    describe,
    hermetic_env,
    issued_credentials,
    run_as,
    serve_broker,
    start_moto,
    write_config,
)

SEED = REPO_ROOT / "deploy" / "policies" / "s3-prefix-readwrite.json"
BUCKET = "example-bucket"  # the seed's bucket
NARROWED = Rule("narrowed", {"uid": 61001})  # role arn:aws:iam::<account>:role/narrowed
UNNARROWED = Rule("unnarrowed", {"uid": 61002})

INSIDE = "client-a/uploads/report.csv"
OUTSIDE = ("client-a/private.csv", "client-b/uploads/report.csv")

# Run as the app's uid: boto3 with only its default credential chain (the broker via IMDS),
# writing each key given and printing {key: "ok" or the S3 error code}.
PUT_OBJECTS = """
import json, sys
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
results = {}
for key in sys.argv[2:]:
    try:
        s3.put_object(Bucket=sys.argv[1], Key=key, Body=b"data")
        results[key] = "ok"
    except ClientError as err:
        results[key] = err.response["Error"]["Code"]
print(json.dumps(results))
"""


def with_policy_file(config: str, rule: Rule, policy_file: Path) -> str:
    """broker_config() text with `policy_file` added to `rule`'s [[app]] (before its match table)."""
    role_line = f'role_arn = "{rule.app.role_arn}"\n'
    assert config.count(role_line) == 1, config
    return config.replace(role_line, f'{role_line}policy_file = "{policy_file}"\n')


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_moto(tmp_path_factory.mktemp("moto-policy")) as server:
        s3 = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(s3={"addressing_style": "path"}, proxies={}),
        )
        s3.create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def broker(built: None, moto: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    workdir = tmp_path_factory.mktemp("broker-policy")
    text = broker_config(
        listen="127.0.0.1:0", sts_endpoint=moto.endpoint, state_dir=workdir / "state", rules=[NARROWED, UNNARROWED]
    )
    config = write_config(workdir / "imds-broker.toml", with_policy_file(text, NARROWED, SEED))
    with serve_broker(workdir, config) as server:
        yield server, config


def put_objects(uid: int, homes: dict[int, Path], moto: Server, broker: Server, keys: list[str]) -> dict[str, str]:
    env = client_env(homes[uid], sts_endpoint=moto.endpoint, imds_endpoint=broker.endpoint)
    env["AWS_ENDPOINT_URL_S3"] = moto.endpoint
    result = run_as(uid, [str(PYTHON), "-c", PUT_OBJECTS, BUCKET, *keys], env)
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def explain(config: Path, app: str, action: str, key: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BROKER_BIN), "explain", "--config", str(config), "--app", app, "--action", action]
    return subprocess.run(
        [*argv, "--resource", f"arn:aws:s3:::{BUCKET}/{key}"],
        env=hermetic_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_session_policy_reaches_sts_and_scopes_the_app(
    moto: Server, broker: tuple[Server, Path], client_homes: dict[int, Path]
) -> None:
    server, config = broker
    results = put_objects(NARROWED.app.uid, client_homes, moto, server, [INSIDE, *OUTSIDE])
    assert results[INSIDE] == "ok", results
    put_objects(UNNARROWED.app.uid, client_homes, moto, server, ["anything/at-all.csv"])

    # What STS received: the seed, minified, for the narrowed app only.
    sessions = {s["role_arn"]: s for s in issued_credentials(moto.endpoint)}
    sent = sessions[NARROWED.app.role_arn]["policy"]
    assert sent is not None, sessions
    assert json.loads(sent) == json.loads(SEED.read_text()), sent
    assert not any(c in sent for c in " \n\t"), f"sent with whitespace: {sent!r}"
    assert sessions[UNNARROWED.app.role_arn]["policy"] is None, sessions
    assert NARROWED.app.role_arn.startswith(f"arn:aws:iam::{ACCOUNT_ID}:")

    # What IAM would decide with that session policy, for the very writes the client made.
    allowed = explain(config, NARROWED.name, "s3:PutObject", INSIDE)
    assert allowed.returncode == 0, describe(allowed)
    assert allowed.stdout.endswith("result: allowed by statement 1 (ReadWriteOwnPrefix)\n"), allowed.stdout
    for key in OUTSIDE:
        denied = explain(config, NARROWED.name, "s3:PutObject", key)
        assert denied.returncode == 1, describe(denied)
        assert denied.stdout.endswith("result: implicitly denied: no statement allows\n"), denied.stdout

    # Canary: moto records session policies but does not enforce them (see the module doc).
    for key in OUTSIDE:
        assert results[key] == "ok", (
            f"moto now refuses {key} ({results[key]}): it enforces session policies, so assert "
            "AccessDenied here instead of relying on `explain` alone"
        )
