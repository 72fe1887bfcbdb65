"""The container credentials endpoint with real SDKs: each client runs as its app's uid with
only AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE set (IMDS
disabled), and must end up as its own role; another uid cannot read the token file;
`imds-broker exec` sets the variables (and removes static keys); `imds-broker token rotate`
makes the old token stale at once; refusals land in the audit file, tokens never do."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from harness import (
    APP_A,
    APP_B,
    BROKER_BIN,
    CLIENTS,
    CLIENTS_DIR,
    PYTHON,
    REGION,
    AuditFile,
    Server,
    add_link_local_address,
    as_user,
    client_env,
    describe,
    netns_exec,
    network_namespace,
    run_as,
    serve_broker,
    start_moto,
    write_config,
)

CONTAINER_APPS = (APP_A, APP_B)
DEFAULT_ADDRESS = "169.254.170.23"


@dataclass(frozen=True)
class ContainerBroker:
    server: Server
    config: Path
    url: str  # the endpoint's credentials path
    token_dir: Path
    audit: Path
    sts_endpoint: str

    def token_file(self, app: str) -> Path:
        return self.token_dir / f"{app}.token"

    def env(self, home: Path, app: str, token_file: Path | None = None) -> dict[str, str]:
        """A client environment in which the container endpoint is the only credential source."""
        env = client_env(home, sts_endpoint=self.sts_endpoint, imds_endpoint=None)
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"{self.url}/{app}"
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = str(token_file or self.token_file(app))
        return env


@contextmanager
def serve_container_broker(
    sts_endpoint: str, *, listen: str = "127.0.0.1:0", netns: str | None = None
) -> Iterator[ContainerBroker]:
    # Not under pytest's tmp_path (0700 root): the app uids must reach their token files.
    root = Path(tempfile.mkdtemp(prefix="imds-broker-e2e-container-"))
    root.chmod(0o711)
    try:
        token_dir = root / "tokens"
        state = root / "state"
        apps = "".join(
            f"""
[[app]]
name = "{app.name}"
role_arn = "{app.role_arn}"
match = {{ uid = {app.uid} }}
container = {{}}
"""
            for app in CONTAINER_APPS
        )
        config = write_config(
            root / "imds-broker.toml",
            f"""\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state}"

[sts]
region = "{REGION}"
endpoint_url = "{sts_endpoint}"

[container]
listen = ["{listen}"]
token_dir = "{token_dir}"
{apps}""",
        )
        with serve_broker(root, config, launcher=netns_exec(netns)) as server:
            imds, container = server.wait_listening(2)
            assert imds != container
            yield ContainerBroker(
                server=server,
                config=config,
                url=f"http://{container}/v1/credentials",
                token_dir=token_dir,
                audit=state / "audit.log",
                sts_endpoint=sts_endpoint,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def container_broker(built: None, moto_sts: Server, client_homes: dict[int, Path]) -> Iterator[ContainerBroker]:
    with serve_container_broker(moto_sts.endpoint) as broker:
        yield broker


@pytest.fixture(scope="module")
def default_address_broker(
    built: None, client_homes: dict[int, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ContainerBroker, str]]:
    """The endpoint on its default address, 169.254.170.23:80, in a namespace of its own
    (with moto on the namespace's loopback): the address every SDK allows over plain HTTP."""
    with ExitStack() as stack:
        try:
            netns = stack.enter_context(network_namespace())
        except PermissionError as err:
            pytest.skip(f"this machine does not let the suite create a network namespace: {err}")
        add_link_local_address(netns, DEFAULT_ADDRESS)
        moto = stack.enter_context(start_moto(tmp_path_factory.mktemp("moto-container"), netns=netns))
        broker = stack.enter_context(serve_container_broker(moto.endpoint, listen=f"{DEFAULT_ADDRESS}:80", netns=netns))
        yield broker, netns


def fetch(url: str, token: str | None) -> tuple[int, Message, dict]:
    """GET url with the token as Authorization; (status, headers, JSON body)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token is not None:
        request.add_header("Authorization", token)
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(request, timeout=10) as response:
            return response.status, response.headers, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.load(err)


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
@pytest.mark.parametrize("app", CONTAINER_APPS, ids=lambda a: a.name)
def test_sdk_gets_its_apps_role_from_the_token_file(container_broker, client_homes, client, app):
    env = container_broker.env(client_homes[app.uid], app.name)
    result = run_as(app.uid, client.argv, env)

    assert result.returncode == 0, describe(result)
    assert re.fullmatch(app.assumed_role_arn_re, result.stdout.strip()), describe(result)


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_sdk_finds_the_endpoint_at_its_default_address(default_address_broker, client_homes, client):
    broker, netns = default_address_broker
    env = broker.env(client_homes[APP_B.uid], APP_B.name)
    # The generic path and no port: the token alone says which app this is.
    env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"http://{DEFAULT_ADDRESS}/v1/credentials"

    result = run_as(APP_B.uid, client.argv, env, netns=netns)

    assert result.returncode == 0, describe(result)
    assert re.fullmatch(APP_B.assumed_role_arn_re, result.stdout.strip()), describe(result)


def test_token_files_are_readable_by_their_app_user_only(container_broker, client_homes):
    path = container_broker.token_file(APP_A.name)
    info = path.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (APP_A.uid, 0o400)
    assert not path.read_bytes().endswith(b"\n")

    home_b = client_homes[APP_B.uid]
    read = run_as(APP_B.uid, ["cat", str(path)], {"HOME": str(home_b), "PATH": "/usr/bin:/bin"})
    assert read.returncode != 0 and "Permission denied" in read.stderr, describe(read)
    listing = run_as(APP_B.uid, ["ls", str(container_broker.token_dir)], {"HOME": str(home_b), "PATH": "/usr/bin:/bin"})
    assert listing.returncode != 0, describe(listing)

    # boto3 as app-b, pointed at app-a's file, gets nothing (and not app-a's role).
    env = container_broker.env(home_b, APP_A.name, token_file=path)
    stolen = run_as(APP_B.uid, [str(PYTHON), str(CLIENTS_DIR / "boto3_whoami.py")], env)
    assert stolen.returncode != 0, describe(stolen)
    assert APP_A.name not in stolen.stdout


def test_exec_gives_the_command_its_apps_credentials_and_drops_static_keys(container_broker, client_homes):
    home = client_homes[APP_A.uid]
    env = client_env(home, sts_endpoint=container_broker.sts_endpoint, imds_endpoint=None)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    # A long-term key in the environment would win over every other source; exec removes it.
    env["AWS_ACCESS_KEY_ID"] = "AKIAIOSFODNN7EXAMPLE"
    env["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    # root resolves the app from the config, then the command drops to the app's uid. The
    # daemon listens on port 0; exec reads the port from a copy that names the real one.
    served = container_broker.url.removeprefix("http://").split("/")[0]
    config = write_config(
        container_broker.config.with_name("exec.toml"),
        container_broker.config.read_text().replace(
            '[container]\nlisten = ["127.0.0.1:0"]', f'[container]\nlisten = ["{served}"]'
        ),
    )
    argv = [
        str(BROKER_BIN), "exec", "--config", str(config), "--app", APP_A.name, "--",
        *as_user(APP_A.uid), str(PYTHON), str(CLIENTS_DIR / "boto3_whoami.py"),
    ]  # fmt: skip
    result = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, describe(result)
    assert re.fullmatch(APP_A.assumed_role_arn_re, result.stdout.strip()), describe(result)

    # Without the config (an app user cannot read it), --url and --token-file say where.
    argv = [
        *as_user(APP_B.uid), str(BROKER_BIN), "exec", "--app", APP_B.name,
        "--url", f"{container_broker.url}/{APP_B.name}",
        "--token-file", str(container_broker.token_file(APP_B.name)),
        "--", str(PYTHON), str(CLIENTS_DIR / "boto3_whoami.py"),
    ]  # fmt: skip
    result = subprocess.run(argv, env=env, cwd=client_homes[APP_B.uid], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, describe(result)
    assert re.fullmatch(APP_B.assumed_role_arn_re, result.stdout.strip()), describe(result)

    # A user who cannot read the token file is told so before the command runs.
    argv = [
        *as_user(APP_B.uid), str(BROKER_BIN), "exec", "--app", APP_A.name,
        "--url", f"{container_broker.url}/{APP_A.name}",
        "--token-file", str(container_broker.token_file(APP_A.name)),
        "--", "/bin/echo", "ran",
    ]  # fmt: skip
    result = subprocess.run(argv, env=env, cwd=client_homes[APP_B.uid], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, describe(result)
    assert "ran" not in result.stdout and "cannot read the token file" in result.stderr, describe(result)


def test_wrong_and_stale_tokens_are_refused_and_audited(container_broker, client_homes):
    url = container_broker.url
    old = container_broker.token_file(APP_A.name).read_text()

    status, headers, body = fetch(url, None)
    assert status == 401 and headers["Content-Type"] == "application/json", (status, headers)
    assert body["code"] == body["Code"] == "Unauthorized"

    status, _, body = fetch(url, "ibct_" + "A" * 43)
    assert status == 403 and body["code"] == "AccessDenied", body

    status, _, body = fetch(f"{url}/{APP_B.name}", old)
    assert status == 403, body

    status, _, doc = fetch(url, old)
    assert status == 200 and doc["RoleArn"] == APP_A.role_arn, doc

    rotate = subprocess.run(
        [str(BROKER_BIN), "token", "rotate", APP_A.name, "--config", str(container_broker.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert rotate.returncode == 0, describe(rotate)
    new = container_broker.token_file(APP_A.name).read_text()
    assert new != old
    status, _, body = fetch(url, old)
    assert status == 403 and "replaced" in body["message"], body
    # The app itself just reads the file again.
    env = container_broker.env(client_homes[APP_A.uid], APP_A.name)
    again = run_as(APP_A.uid, [str(PYTHON), str(CLIENTS_DIR / "boto3_whoami.py")], env)
    assert again.returncode == 0, describe(again)

    unknown = subprocess.run(
        [str(BROKER_BIN), "token", "rotate", "no-such-app", "--config", str(container_broker.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unknown.returncode == 1 and "no such app" in unknown.stderr, describe(unknown)

    # The daemon writes its audit file from a thread, after answering: wait for the events.
    audit = AuditFile(container_broker.audit)
    for reason, app in (("missing", None), ("unknown", None), ("other_app", APP_A.name), ("stale", APP_A.name)):
        audit.wait_for_some(event="container_token.rejected", reason=reason, app=app)
    audit.wait_for_some(event="container_token.rotated", cause="requested")
    audit.wait_for_some(event="credentials.issued", endpoint="container")
    events = audit.events()
    rejected = [e for e in events if e.get("event") == "container_token.rejected"]
    reasons = {(e.get("reason"), e.get("app")) for e in rejected}
    assert ("missing", None) in reasons, rejected
    assert ("unknown", None) in reasons, rejected
    assert ("other_app", APP_A.name) in reasons, rejected
    assert ("stale", APP_A.name) in reasons, rejected
    rotated = [e for e in events if e.get("event") == "container_token.rotated" and e.get("cause") == "requested"]
    assert [e["app"] for e in rotated] == [APP_A.name], rotated
    issued = [e for e in events if e.get("event") == "credentials.issued" and e.get("endpoint") == "container"]
    assert issued, events
    assert {e["app"] for e in issued} <= {APP_A.name, APP_B.name}
    assert all(re.fullmatch(r"[A-Z0-9]{16,128}", e["access_key_id"]) for e in issued), issued
    # Never a token: neither the old nor the new one is anywhere in the audit file or the log.
    trail = container_broker.audit.read_text() + container_broker.server.stderr_text()
    assert old not in trail and new not in trail

    verify = subprocess.run([str(BROKER_BIN), "audit", "verify", str(container_broker.audit)], capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, describe(verify)


def test_the_state_file_keeps_digests_not_tokens(container_broker):
    state = json.loads((container_broker.audit.parent / "container-tokens.json").read_text())
    token = container_broker.token_file(APP_B.name).read_text()
    assert set(state["apps"]) == {APP_A.name, APP_B.name}
    assert token not in json.dumps(state)
    assert stat.S_IMODE(os.stat(container_broker.audit.parent / "container-tokens.json").st_mode) == 0o600


def test_status_shows_each_apps_token_file_not_the_token(container_broker):
    result = subprocess.run(
        [str(BROKER_BIN), "status", "--config", str(container_broker.config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, describe(result)
    for app in CONTAINER_APPS:
        line = next((l for l in result.stdout.splitlines() if l.startswith(f"{app.name}: container token")), None)
        assert line is not None and str(container_broker.token_file(app.name)) in line, describe(result)
        assert container_broker.token_file(app.name).read_text() not in result.stdout
