"""Building blocks of the end-to-end suite: paths, the apps under test, child servers,
broker configs, running a command as another uid, and throwaway network namespaces.

Everything here is plain functions and small classes; conftest.py turns them into
fixtures. Every wait is bounded and every child process is stopped by whoever
started it (see `serving`).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Rule:
    """One `[[app]]` entry with any `match` table (uid, exe, cgroup, source, ...)."""

    name: str
    match: dict[str, int | str | list[str] | dict[str, int | str]]

    @property
    def app(self) -> App:
        # Roles are named after their app, as for the uid-only apps.
        return App(self.name, int(self.match.get("uid", -1)))

    def toml(self) -> str:
        entries = "".join(f"{key} = {toml_value(value)}\n" for key, value in self.match.items())
        return f"""
[[app]]
name = "{self.name}"
role_arn = "{self.app.role_arn}"
[app.match]
{entries}"""


def toml_value(value: int | str | list[str] | dict[str, int | str]) -> str:
    # A JSON string of printable ASCII is also a TOML basic string.
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    return json.dumps(value)


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


def start_moto(
    log_dir: Path, netns: str | None = None, *, extra_env: dict[str, str] | None = None
) -> AbstractContextManager[Server]:
    """Serve moto as STS (a context manager yielding its Server); `extra_env` is added to
    its environment (e.g. libfaketime's variables)."""
    argv = [*netns_exec(netns), str(PYTHON), str(CLIENTS_DIR / "moto_sts.py")]
    return serving("moto", argv, hermetic_env(**(extra_env or {})), log_dir)


def issued_credentials(moto_endpoint: str) -> list[dict]:
    """Every AssumeRole result moto has handed out (from its state-dump API)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # stay on loopback
    with no_proxy.open(f"{moto_endpoint}/moto-api/data.json", timeout=10) as response:
        return json.load(response)["sts"]["AssumedRole"]


# --------------------------------------------------------------------------- broker


def broker_config(
    *, listen: str, sts_endpoint: str, state_dir: Path, rules: Sequence[Rule] | None = None
) -> str:
    """The broker's config; `rules` replaces the default uid rules of MAPPED_APPS."""
    if rules is None:
        rules = [Rule(app.name, {"uid": app.uid}) for app in MAPPED_APPS]
    apps = "".join(rule.toml() for rule in rules)
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
    return serve_broker(workdir, config, launcher=netns_exec(netns), rust_log=rust_log)


def serve_broker(
    workdir: Path,
    config: Path,
    *,
    launcher: Sequence[str] = (),
    rust_log: str = "info",
    log_format: str | None = None,
    binary: Path = BROKER_BIN,
    extra_env: dict[str, str] | None = None,
) -> AbstractContextManager[Server]:
    """Serve the broker from an existing config file (a context manager yielding its
    Server); `launcher` prefixes the command (e.g. to enter a network namespace), and
    `extra_env` is added to its environment (e.g. libfaketime's variables)."""
    env = hermetic_env(
        # Source credentials for AssumeRole; moto accepts any.
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        # Empty rather than missing profile files: no ~/.aws, and no warning per load.
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        RUST_LOG=rust_log,
        **(extra_env or {}),
    )
    argv = [*launcher, str(binary), "serve", "--config", str(config)]
    if log_format is not None:
        argv += ["--log-format", log_format]
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
    return subprocess.run(
        [*netns_exec(netns), *as_user(uid), *argv],
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


def as_user(uid: int, gid: int | None = None) -> list[str]:
    """The command prefix that runs a program as uid:gid (gid defaults to uid), with no
    supplementary groups and no passwd entry needed."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}", "--clear-groups"]


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


# --------------------------------------------------------------------------- identity
#
# For identity beyond uid (exe, exe_sha256, gid, cgroup, systemd unit, source address):
# cgroup v2 paths the test creates, executables at paths it chooses, clients held before
# they open any socket so the test can place them, a broker in a network namespace of its
# own with a veth to a second namespace for "remote" callers, and its JSON audit log.

CGROUP_PREFIX = "imdsb-test-"
HELD_PY = CLIENTS_DIR / "held.py"
IDENTITY_PROBE_PY = CLIENTS_DIR / "identity_probe.py"
# The interpreter under the venv; copies of it are the distinct executables under test.
SYSTEM_PYTHON = PYTHON.resolve()
# The broker writes an audit line while it answers; this only bounds the wait for it.
AUDIT_WAIT_S = 10
# How often to look again for something only a file shows (an audit line, an empty cgroup).
POLL_INTERVAL_S = 0.05
# The veth between the broker's namespace and the remote callers' namespace.
BROKER_VETH_ADDR = "10.200.0.1"
REMOTE_ADDRS = ("10.200.0.2", "10.200.0.3")
VETH_PREFIX_LEN = 24


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted here (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
    hybrid hosts)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount, _, fs = line.partition(" - ")
        if fs.split()[0] == "cgroup2":
            return Path(mount.split()[4])
    raise FileNotFoundError("no cgroup2 mount in /proc/self/mountinfo")


class CgroupTree:
    """A private subtree `/imdsb-test-<pid>-<random>` of the cgroup v2 hierarchy. Paths
    are given relative to it and returned as the broker reports them: relative to the
    cgroup2 mount, starting with `/`."""

    def __init__(self) -> None:
        self.mount = cgroup2_mount()
        self.top = f"/{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"

    def path(self, rel: str) -> str:
        return f"{self.top}/{rel}"

    def place(self, pid: int, rel: str) -> None:
        """Move process `pid` into cgroup `rel`, created if needed."""
        directory = self.mount / self.path(rel).lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Remove the subtree, deepest first. Whoever started a client stops it first; a
        process still inside can only be one of this test's clients or their children, so
        it is killed by pid before its cgroup is removed."""
        top = self.mount / self.top.lstrip("/")
        for directory, _, _ in os.walk(top, topdown=False):
            self._empty(Path(directory))
            os.rmdir(directory)

    @staticmethod
    def _empty(directory: Path) -> None:
        for pid in (directory / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while "populated 1" in (directory / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"cgroup {directory} still has processes after {STOP_TIMEOUT_S}s")
            time.sleep(POLL_INTERVAL_S)


def install_python_copy(dest: Path, tag: bytes = b"") -> Path:
    """A copy of the system python at `dest`: another executable path that runs exactly
    like the original. `tag` is appended after the ELF image, which the loader never
    reads, to give the copy a sha256 of its own as well."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SYSTEM_PYTHON, dest)
    with open(dest, "ab") as file:
        file.write(tag)
    dest.chmod(0o755)
    return dest


def python_sha256(tag: bytes = b"") -> str:
    """The sha256 of `install_python_copy(..., tag)`."""
    digest = hashlib.sha256(SYSTEM_PYTHON.read_bytes())
    digest.update(tag)
    return digest.hexdigest()


def netns_enter(netns: str | None) -> list[str]:
    """Like netns_exec, but switches the network namespace only: `ip netns exec` also
    remounts /sys, which hides the cgroup2 mount (the broker maps cgroup ids to paths
    through it)."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []


def connect_namespaces(netns_a: str, addr_a: str, netns_b: str, addrs_b: Sequence[str]) -> None:
    """A veth pair between two namespaces this test created: `addr_a` on one end,
    `addrs_b` on the other, all in one /VETH_PREFIX_LEN."""
    ip("link", "add", "imdsb-a", "netns", netns_a, "type", "veth", "peer", "name", "imdsb-b", "netns", netns_b)
    ip("-n", netns_a, "addr", "add", f"{addr_a}/{VETH_PREFIX_LEN}", "dev", "imdsb-a")
    for addr in addrs_b:
        ip("-n", netns_b, "addr", "add", f"{addr}/{VETH_PREFIX_LEN}", "dev", "imdsb-b")
    ip("-n", netns_a, "link", "set", "imdsb-a", "up")
    ip("-n", netns_b, "link", "set", "imdsb-b", "up")


class _Drain:
    """Reads a child's pipe to EOF on a thread, keeping every line, so the child never
    blocks on a full pipe and the test can wait for one line with a timeout."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line, None at EOF; raises queue.Empty after `timeout`."""
        return self._queue.get(timeout=timeout)

    def text(self) -> str:
        self._thread.join(STOP_TIMEOUT_S)
        return "".join(self.lines)


class HeldProcess:
    """A client started through clients/held.py: it waits before running its script, so
    the test can place it (in a cgroup, at a pid) before it opens any socket. `release()`
    lets it run; its stdin stays open until `finish()`.

    Also fits any client driven line by line: `send()` a line, `read_line()` its answer."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path, pass_fds: Sequence[int] = ()):
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )
        self._stdout = _Drain(self.proc.stdout)
        self._stderr = _Drain(self.proc.stderr)

    @property
    def pid(self) -> int:
        # nsenter (network namespace only) and setpriv exec in place: this is the client's pid.
        return self.proc.pid

    def wait_held(self, timeout: float = CLIENT_TIMEOUT_S) -> None:
        """Wait until held.py runs and waits (nsenter and setpriv have exec'd into it)."""
        try:
            line = self._stderr.next_line(timeout)
        except queue.Empty:
            line = None
        if line != "held\n":
            self.stop()
            raise AssertionError(f"held.py did not start\n{describe(self._completed())}")

    def release(self) -> None:
        self.send("go")

    def send(self, line: str) -> None:
        """Write one line to the client's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n")
        self.proc.stdin.flush()

    def read_line(self, timeout: float = CLIENT_TIMEOUT_S) -> str:
        """The client's next stdout line, for clients that report a step."""
        try:
            line = self._stdout.next_line(timeout)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"no output within {timeout}s\n{describe(self._completed())}") from None
        if line is None:
            raise AssertionError(f"exited without the expected line\n{describe(self.finish())}")
        return line.rstrip("\n")

    def finish(self, timeout: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Close its stdin, wait for it to exit, and return what it did."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # it has exited already
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"still running after {timeout}s\n{describe(self._completed())}") from None
        return self._completed()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def _completed(self) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, self._stdout.text(), self._stderr.text())


def fields_match(fields: dict, expected: dict) -> bool:
    """Whether an audit event's fields hold every expected value. Values compare as text
    (a uid may be logged as a number or a string); a set means any of its members; None
    means the field is absent."""
    for key, want in expected.items():
        if want is None:
            if key in fields:
                return False
            continue
        if key not in fields:
            return False
        wanted = {str(w) for w in want} if isinstance(want, (set, frozenset)) else {str(want)}
        if str(fields[key]) not in wanted:
            return False
    return True


class AuditLog:
    """The broker's audit trail: with `--log-format json` every decision is one JSON line
    on stderr with `"target": "audit"`. Events are their `fields` objects."""

    def __init__(self, broker: Server):
        self.broker = broker

    def events(self) -> list[dict]:
        events = []
        for line in self.broker.stderr_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line may be half-written
                continue
            if isinstance(record, dict) and record.get("target") == "audit":
                events.append(record.get("fields", {}))
        return events

    def mark(self) -> int:
        """The current end of the trail: pass it as `after` to see only later events."""
        return len(self.events())

    def find(self, after: int = 0, **expected) -> list[dict]:
        return [event for event in self.events()[after:] if fields_match(event, expected)]

    def wait_for(self, after: int = 0, timeout: float = AUDIT_WAIT_S, **expected) -> dict:
        """The one event after `after` whose fields match `expected` (see fields_match),
        waiting up to `timeout` for the broker to write it. Fails on none or several."""
        (event,) = self.wait_for_all(after, 1, timeout, **expected)
        return event

    def wait_for_all(self, after: int, count: int, timeout: float = AUDIT_WAIT_S, **expected) -> list[dict]:
        """Exactly `count` events after `after` matching `expected`, waiting up to
        `timeout` for the broker to write them."""
        found = self._wait_for_at_least(after, count, timeout, expected)
        assert len(found) == count, f"{len(found)} audit events with {expected}, expected {count}:\n{self.dump(after)}"
        return found

    def wait_for_some(self, after: int = 0, timeout: float = AUDIT_WAIT_S, **expected) -> list[dict]:
        """Every event after `after` matching `expected`, once there is at least one,
        waiting up to `timeout` for the broker to write it."""
        return self._wait_for_at_least(after, 1, timeout, expected)

    def _wait_for_at_least(self, after: int, count: int, timeout: float, expected: dict) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(found := self.find(after, **expected)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(found)} of {count} audit events with {expected} within {timeout}s; "
                    f"audit events since the mark:\n{self.dump(after)}"
                )
            time.sleep(POLL_INTERVAL_S)
        return found

    def dump(self, after: int = 0) -> str:
        return "\n".join(json.dumps(event) for event in self.events()[after:]) or "(none)"


class AuditFile(AuditLog):
    """The broker's audit file: one JSON event per line, its fields at the top level,
    written by the daemon's writer thread after it answers (so wait for events)."""

    def __init__(self, path: Path):
        self.path = path

    def events(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:  # nothing written yet
            return []
        events = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # the last line may be half-written
                    break
                raise AssertionError(f"{self.path}:{number} is not JSON: {line!r}") from None
        return events


@dataclass
class IdentityLab:
    """A broker serving identity rules, and the means to call it as any process: see
    identity_lab()."""

    broker: Server
    moto: Server
    config: Path
    cgroups: CgroupTree
    exe_root: Path
    scratch: Path  # world-writable, for clients' unix sockets
    homes: dict[int, Path]
    broker_netns: str
    remote_netns: str
    clients: list[HeldProcess] = field(default_factory=list)

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.broker)

    def endpoint(self, host: str = "127.0.0.1") -> str:
        port = self.broker.addresses[0].rsplit(":", 1)[1]
        return f"http://{host}:{port}"

    def exe(self, rel: str) -> Path:
        return self.exe_root / rel

    def client_env(self, uid: int) -> dict[str, str]:
        return client_env(self.homes[uid], sts_endpoint=self.moto.endpoint, imds_endpoint=self.endpoint())

    def spawn(
        self,
        *,
        uid: int,
        exe: Path,
        cgroup: str,
        script: Path,
        args: Sequence[str] = (),
        gid: int | None = None,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> HeldProcess:
        """Start `exe held.py script args...` as uid:gid in the broker's network namespace,
        held, and place it in cgroup `cgroup` (relative to the test's subtree)."""
        argv = [*netns_enter(self.broker_netns), *as_user(uid, gid), str(exe), str(HELD_PY), str(script), *args]
        client = HeldProcess(argv, {**self.client_env(uid), **(env or {})}, self.homes[uid], pass_fds)
        self.clients.append(client)
        self.cgroups.place(client.pid, cgroup)
        return client

    def probe(
        self,
        *,
        uid: int,
        exe: Path,
        cgroup: str,
        args: Sequence[str] = (),
        gid: int | None = None,
        host: str = "127.0.0.1",
    ) -> dict:
        """clients/identity_probe.py run by `exe` as uid:gid in cgroup `cgroup`, against
        the broker at `host`; its JSON report (see there for `args`)."""
        client = self.spawn(
            uid=uid, gid=gid, exe=exe, cgroup=cgroup, script=IDENTITY_PROBE_PY, args=[self.endpoint(host), *args]
        )
        client.release()
        return report_of(client.finish())

    def remote_probe(self, source: str, *args: str) -> dict:
        """clients/identity_probe.py from the remote namespace, from address `source` (see
        there for `args`, e.g. `--source-port`)."""
        argv = [
            *netns_enter(self.remote_netns),
            str(PYTHON),
            str(IDENTITY_PROBE_PY),
            self.endpoint(BROKER_VETH_ADDR),
            "--bind",
            source,
            *args,
        ]
        result = subprocess.run(
            argv, env=hermetic_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S
        )
        return report_of(result)

    def stop_clients(self) -> None:
        for client in self.clients:
            client.stop()


def report_of(result: subprocess.CompletedProcess[str]) -> dict:
    """The JSON a client printed, after checking it ran to completion."""
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


@contextmanager
def identity_lab(
    workdir: Path, homes: dict[int, Path], rules: Sequence[Rule], executables: dict[str, bytes]
) -> Iterator[IdentityLab]:
    """A broker serving `rules` with JSON logs, in a network namespace of its own (moto
    beside it as STS, listening on 0.0.0.0 there) with a veth to a second namespace for
    remote callers (BROKER_VETH_ADDR <-> REMOTE_ADDRS); python copies installed per
    `executables` ({relative path: tag}) under a world-readable directory; a private
    cgroup subtree. Everything is removed on exit, failure included.

    Raises PermissionError when this machine does not let us create a network namespace.
    """
    with ExitStack() as stack:
        exe_root = Path(tempfile.mkdtemp(prefix="imdsb-exe-"))
        stack.callback(shutil.rmtree, exe_root, ignore_errors=True)
        for rel, tag in executables.items():
            install_python_copy(exe_root / rel, tag)
        scratch = exe_root / "run"
        scratch.mkdir()
        for directory in (exe_root, *exe_root.rglob("*")):
            if directory.is_dir():
                directory.chmod(0o755)  # the client uids run and read what is in here
        scratch.chmod(0o1777)
        cgroups = CgroupTree()
        stack.callback(cgroups.remove)
        broker_netns = stack.enter_context(network_namespace("imdsb-id"))
        remote_netns = stack.enter_context(network_namespace("imdsb-rm"))
        connect_namespaces(broker_netns, BROKER_VETH_ADDR, remote_netns, REMOTE_ADDRS)
        moto = stack.enter_context(start_moto(workdir / "moto", netns=broker_netns))
        config = write_config(
            workdir / "imds-broker.toml",
            broker_config(listen="0.0.0.0:0", sts_endpoint=moto.endpoint, state_dir=workdir / "state", rules=rules),
        )
        broker = stack.enter_context(
            serve_broker(workdir / "broker", config, launcher=netns_enter(broker_netns), log_format="json")
        )
        lab = IdentityLab(broker, moto, config, cgroups, exe_root, scratch, homes, broker_netns, remote_netns)
        stack.callback(lab.stop_clients)
        yield lab
