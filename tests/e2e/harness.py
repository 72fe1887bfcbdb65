"""Building blocks of the end-to-end suite: paths, the apps under test, child servers,
broker configs, running a command as another uid, and throwaway network namespaces.

Everything here is plain functions and small classes; conftest.py turns them into
fixtures. Every wait is bounded and every child process is stopped by whoever
started it (see `serving`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parents[1]
CLIENTS_DIR = E2E_DIR / "clients"

BROKER_BIN = REPO_ROOT / "target" / "debug" / "imds-broker"
RUST_WHOAMI_BIN = REPO_ROOT / "target" / "debug" / "examples" / "sdk_whoami"
JS_DIR = E2E_DIR / "js"
# The venv's interpreter: tests/run-all.sh builds the venv on /usr/bin/python3, which
# (unlike a pyenv interpreter under /root) the unprivileged client uids can execute.
PYTHON = Path(sys.executable)
AWS_CLI = PYTHON.parent / "aws"
NODE = shutil.which("node") or "node"

ACCOUNT_ID = "111122223333"
REGION = "us-east-1"
IMDS_TOKEN_TTL = "21600"  # what botocore, JS and Rust request
IMDS_DEFAULT_ENDPOINT = "http://169.254.169.254"
ROLE_LISTING_PATH = "/latest/meta-data/iam/security-credentials/"

START_TIMEOUT_S = 30  # until a server prints `listening on`
STOP_TIMEOUT_S = 10  # after SIGTERM, before SIGKILL
CLIENT_TIMEOUT_S = 90  # one SDK call; the SDKs' own IMDS timeouts are a few seconds


@dataclass(frozen=True)
class App:
    name: str
    uid: int

    @property
    def role_arn(self) -> str:
        return f"arn:aws:iam::{ACCOUNT_ID}:role/{self.name}"

    @property
    def assumed_role_arn_re(self) -> str:
        return rf"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{re.escape(self.name)}/\S+"


APP_A = App("app-a", 61001)
APP_B = App("app-b", 61002)
MAPPED_APPS = (APP_A, APP_B)
UNMAPPED_UID = 61003
CLIENT_UIDS = (APP_A.uid, APP_B.uid, UNMAPPED_UID)


@dataclass(frozen=True)
class Client:
    """A real AWS SDK (or CLI) whose default credential chain is under test."""

    name: str
    argv: tuple[str, ...]
    # What the client prints on stderr when its chain finds no credentials at all.
    no_credentials_re: str


CLIENTS = (
    Client(
        "boto3",
        (str(PYTHON), str(CLIENTS_DIR / "boto3_whoami.py")),
        r"^NoCredentialsError: Unable to locate credentials",
    ),
    Client(
        "awscli",
        (str(AWS_CLI), "sts", "get-caller-identity", "--query", "Arn", "--output", "text"),
        r"Unable to locate credentials",
    ),
    Client(
        "js",
        (NODE, str(JS_DIR / "whoami.mjs")),
        r"^CredentialsProviderError: Could not load credentials from any providers",
    ),
    Client(
        "rust",
        (str(RUST_WHOAMI_BIN),),
        r"the credential provider was not enabled: no credentials found in chain",
    ),
)


# --------------------------------------------------------------------------- servers


class Server:
    """A child process that announces each bound address on stdout as
    `listening on ADDR` (imds-broker's contract, mimicked by clients/moto_sts.py).

    stdout is drained by a thread (kept whole, for the secret-leak check); stderr goes
    to a file so a chatty trace log can never block the child on a full pipe.
    """

    LISTENING_RE = re.compile(r"^listening on (\S+)$")

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                list(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._reader = threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True)
        self._reader.start()
        self.addresses: list[str] = []

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # EOF: the child closed stdout, usually by exiting

    def wait_listening(self, count: int = 1, timeout: float = START_TIMEOUT_S) -> list[str]:
        """Block until `count` `listening on` lines arrived; fail on timeout or exit."""
        while len(self.addresses) < count:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(
                    f"{self.name} printed no `listening on` line within {timeout}s\n{self.stderr_tail()}"
                ) from None
            if line is None:
                raise RuntimeError(
                    f"{self.name} exited (code {self.proc.wait(STOP_TIMEOUT_S)}) before listening\n{self.stderr_tail()}"
                )
            if match := self.LISTENING_RE.match(line):
                self.addresses.append(match.group(1))
        return self.addresses

    @property
    def endpoint(self) -> str:
        return f"http://{self.addresses[0]}"

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it lingers; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._reader.join(STOP_TIMEOUT_S)
        return self.proc.returncode

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout_text(self) -> str:
        return "".join(self.stdout_lines)

    def stderr_tail(self, lines: int = 40) -> str:
        tail = self.stderr_text().splitlines()[-lines:]
        return f"--- {self.name} stderr ({self.stderr_path}), last {len(tail)} lines:\n" + "\n".join(tail)


@contextmanager
def serving(name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> Iterator[Server]:
    """Start a Server, wait for its address, and always stop it on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    server = Server(name, argv, env, log_dir)
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def hermetic_env(**extra: str) -> dict[str, str]:
    """This process's environment minus every AWS_* and proxy variable, plus `extra`:
    nothing from the machine (AWS_CA_BUNDLE, a profile, real keys) leaks into a child,
    and no proxy can carry its loopback traffic off the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


def start_moto(log_dir: Path, netns: str | None = None) -> AbstractContextManager[Server]:
    """Serve moto as STS (a context manager yielding its Server)."""
    argv = [*netns_exec(netns), str(PYTHON), str(CLIENTS_DIR / "moto_sts.py")]
    return serving("moto", argv, hermetic_env(), log_dir)


def issued_credentials(moto_endpoint: str) -> list[dict]:
    """Every AssumeRole result moto has handed out (from its state-dump API)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # stay on loopback
    with no_proxy.open(f"{moto_endpoint}/moto-api/data.json", timeout=10) as response:
        return json.load(response)["sts"]["AssumedRole"]


# --------------------------------------------------------------------------- broker


def broker_config(*, listen: str, sts_endpoint: str, state_dir: Path) -> str:
    apps = "".join(
        f"""
[[app]]
name = "{app.name}"
role_arn = "{app.role_arn}"
[app.match]
uid = {app.uid}
"""
        for app in MAPPED_APPS
    )
    return f"""\
[server]
listen = ["{listen}"]
imdsv1 = "disabled"
state_dir = "{state_dir}"

[sts]
region = "{REGION}"
endpoint_url = "{sts_endpoint}"
{apps}"""


def write_config(path: Path, text: str) -> Path:
    # The broker refuses a config that others may write.
    path.write_text(text)
    path.chmod(0o600)
    return path


def start_broker(
    workdir: Path,
    *,
    sts_endpoint: str,
    listen: str = "127.0.0.1:0",
    rust_log: str = "info",
    netns: str | None = None,
) -> AbstractContextManager[Server]:
    """Write a config under `workdir` and serve the broker from it (a context manager
    yielding its Server)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "imds-broker.toml",
        broker_config(listen=listen, sts_endpoint=sts_endpoint, state_dir=workdir / "state"),
    )
    env = hermetic_env(
        # Source credentials for AssumeRole; moto accepts any.
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        # Empty rather than missing profile files: no ~/.aws, and no warning per load.
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        RUST_LOG=rust_log,
    )
    argv = [*netns_exec(netns), str(BROKER_BIN), "serve", "--config", str(config)]
    return serving("imds-broker", argv, env, workdir)


# --------------------------------------------------------------------------- clients


def client_env(home: Path, *, sts_endpoint: str, imds_endpoint: str | None) -> dict[str, str]:
    """A from-scratch environment for an SDK client: no static credentials, no profile,
    no proxy, so IMDS (the broker) is the only place credentials can come from.

    `imds_endpoint=None` leaves the SDKs on their built-in 169.254.169.254.
    """
    env = {
        "PATH": f"{PYTHON.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_REGION": REGION,  # JS and Rust
        "AWS_DEFAULT_REGION": REGION,  # botocore
        "AWS_ENDPOINT_URL_STS": sts_endpoint,
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        # IMDSv2 only: a client that cannot get a token must fail, not fall back.
        "AWS_EC2_METADATA_V1_DISABLED": "true",
        "PYTHONDONTWRITEBYTECODE": "1",  # the client uids cannot write to the repo
        "NODE_NO_WARNINGS": "1",  # the SDK's Node-version notice would drown real errors
    }
    if imds_endpoint is not None:
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds_endpoint
    return env


def run_as(
    uid: int,
    argv: Sequence[str],
    env: dict[str, str],
    *,
    netns: str | None = None,
    timeout: float = CLIENT_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run argv as uid:uid with no supplementary groups (no passwd entry needed)."""
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run(
        [*netns_exec(netns), *setpriv, *argv],
        env=env,
        cwd=env["HOME"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Callers:
    """The local processes calling one broker: runs a client, or a raw IMDS probe, as
    a given uid in that uid's home, with STS at `sts_endpoint`."""

    homes: dict[int, Path]
    sts_endpoint: str
    imds_endpoint: str | None  # None: the SDKs' built-in 169.254.169.254, unconfigured
    netns: str | None = None

    def env(self, uid: int) -> dict[str, str]:
        return client_env(self.homes[uid], sts_endpoint=self.sts_endpoint, imds_endpoint=self.imds_endpoint)

    def whoami(self, client: Client, uid: int) -> subprocess.CompletedProcess[str]:
        return run_as(uid, client.argv, self.env(uid), netns=self.netns)

    def probe(self, uid: int, *paths: str) -> list[dict]:
        """clients/imds_probe.py as `uid`: token PUT, then GET each path with the token."""
        endpoint = self.imds_endpoint or IMDS_DEFAULT_ENDPOINT
        argv = [str(PYTHON), str(CLIENTS_DIR / "imds_probe.py"), endpoint, IMDS_TOKEN_TTL, *paths]
        result = run_as(uid, argv, self.env(uid), netns=self.netns)
        assert result.returncode == 0, describe(result)
        return json.loads(result.stdout)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """An assertion message showing what a client did."""
    return (
        f"command: {' '.join(map(str, result.args))}\nexit code: {result.returncode}\n"
        f"--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    )


def header(response: dict, name: str) -> str | None:
    """A response header by case-insensitive name (None when absent)."""
    return next((value for key, value in response["headers"] if key.lower() == name.lower()), None)


# --------------------------------------------------------------------------- netns


def netns_exec(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@contextmanager
def network_namespace(prefix: str = "imdsb-e2e") -> Iterator[str]:
    """A fresh, uniquely named netns with `lo` up; deleted (after killing whatever
    the test left running inside it) on exit, failure included.

    Raises PermissionError when this machine does not let us create one.
    """
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    created = ip("netns", "add", name, check=False)
    if created.returncode != 0:
        raise PermissionError(f"`ip netns add` failed: {created.stderr.strip()}")
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        # Only processes this test started can be in a namespace it just created.
        pids = ip("netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("netns", "del", name, check=False)


def add_link_local_address(netns: str, address: str) -> str:
    """Put `address`/32 on a dummy interface in `netns`, or on `lo` where this kernel
    has no dummy link type. Returns the device used."""
    if ip("-n", netns, "link", "add", "imds0", "type", "dummy", check=False).returncode == 0:
        device = "imds0"
        ip("-n", netns, "link", "set", device, "up")
    else:
        device = "lo"
    ip("-n", netns, "addr", "add", f"{address}/32", "dev", device)
    return device
