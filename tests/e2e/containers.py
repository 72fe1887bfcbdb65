"""Real containers as IMDS callers: podman (rootful, runc, CNI) confined to this test session.

Layout (everything in network namespaces the session creates; the host's own network, its
iptables and its 169.254.169.254 are never touched):

    container netns  eth0 10.123.0.x --veth--+
    container netns  eth0 10.123.0.y --veth--+-- imdsb0 (bridge) 10.123.0.1
                                                  "host" netns H: lo 169.254.169.254/32 (broker, :80)
                                                                  lo 169.254.123.1/32   (moto, STS)
                                                  podman, conmon, `podman system service`

H stands for the host. The broker runs in H, listening on 169.254.169.254:80, and treats H
as its host namespace (it compares with its own); containers reach it the way they reach a
real host's IMDS: default route via the bridge gateway, into H, where the address is local.
`--network host` containers share H, as they would share the host. H has no link to the real
network (see `assert_imds_is_local`), so no connection can leave for a real IMDS.

Podman's own state is private too: its storage (`--root`, `--runroot`, vfs driver), its tmp
dir, file locks (not the shared /dev/shm/libpod_lock), its CNI network config directory and
the IPAM leases (`dataDir`) all live under one temporary directory, removed at the end. The
only things podman writes outside it are transient and removed with each container: the
container's `/run/netns/netns-*` mount, runc's `/run/runc/<id>` and libcni's
`/var/lib/cni/results/<network>-<id>-eth0` (swept at the end, by the session's own unique
network name), plus the `libpod_parent` cgroup directories that every cgroupfs podman shares.

No registry: the image is imported from a root file system made here (a few directories, an
/etc/passwd with the client uids) and the host's /usr is bind-mounted read-only, as are the
repo's .venv (boto3, aws CLI), tests/e2e/js (JS SDK v3; node is under /usr), the Rust client and
tests/e2e/clients, each at its host path, so harness.CLIENTS' argv work unchanged inside.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    ACCOUNT_ID,
    BROKER_BIN,
    CLIENT_TIMEOUT_S,
    CLIENTS_DIR,
    IMDS_DEFAULT_ENDPOINT,
    JS_DIR,
    NODE,
    PYTHON,
    REGION,
    RUST_WHOAMI_BIN,
    STOP_TIMEOUT_S,
    AuditFile,
    Client,
    Server,
    client_env,
    connect_namespaces,
    describe,
    hermetic_env,
    ip,
    netns_enter,
    network_namespace,
    serve_broker,
    serving,
    write_config,
)

PODMAN = shutil.which("podman")
IMDS_ADDRESS = "169.254.169.254"
# moto (as STS) in H, on an address of H that containers reach through the gateway as they
# reach IMDS: not H's loopback, which a container's 127.0.0.1 is not.
MOTO_ADDRESS = "169.254.123.1"
SUBNET = "10.123.0.0/24"
GATEWAY = "10.123.0.1"
BRIDGE = "imdsb0"
# Behind one more router, for the hop-limit test: H <-> router R <-> client namespace.
ROUTED_HOST_SIDE = "10.124.1.1"
ROUTED_ROUTER_HOST_SIDE = "10.124.1.2"
ROUTED_ROUTER_CLIENT_SIDE = "10.124.2.1"
ROUTED_CLIENT = "10.124.2.2"
ROUTED_CLIENT_NET = "10.124.2.0/24"

# podman's cgroupfs layout: every container's cgroup (v2 path, also on hybrid hosts).
PODMAN_CGROUP_PARENT = "/libpod_parent"
CONTAINER_CGROUP_GLOB = f"{PODMAN_CGROUP_PARENT}/libpod-*"

IMAGE = "localhost/imdsb-e2e/base:1"
PODMAN_TIMEOUT_S = 60  # one podman command; `run` takes ~0.3 s, `rm -f` ~0.2 s here
SERVICE_START_TIMEOUT_S = 30
POLL_INTERVAL_S = 0.05
# A container keeps running this long at most, should every cleanup below fail.
CONTAINER_LIFETIME_S = 3600

CONTAINERS_CONF = """\
[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
# Not the host-wide /dev/shm/libpod_lock: another podman's lock numbers are not ours.
lock_type = "file"
num_locks = 512
tmp_dir = "{tmp_dir}"

[network]
network_backend = "cni"
network_config_dir = "{cni_dir}"
"""

STORAGE_CONF = """\
[storage]
# vfs: no mounts to leave behind, works on any file system (overlay-on-overlay in CI
# containers does not); the image is a few kB.
driver = "vfs"
graphroot = "{graphroot}"
runroot = "{runroot}"
"""


def podman_missing_reason() -> str | None:
    """Why containers cannot run here, or None."""
    if PODMAN is None:
        return "podman is not installed (apt-get install podman runc containernetworking-plugins)"
    if shutil.which("runc") is None:
        return "runc is not installed"
    if not any(Path(d, "bridge").exists() for d in ("/usr/lib/cni", "/opt/cni/bin")):
        return "the CNI bridge plugin is not installed (containernetworking-plugins)"
    return None


def container_env(sts_endpoint: str) -> dict[str, str]:
    """The SDK environment inside a container: harness.client_env with HOME on the
    container's own /tmp, STS at moto, and no IMDS endpoint at all (the SDKs' built-in
    http://169.254.169.254 is what is under test)."""
    env = client_env(Path("/tmp"), sts_endpoint=sts_endpoint, imds_endpoint=None)
    assert not any(name.startswith("AWS_EC2_METADATA_SERVICE_ENDPOINT") for name in env), env
    return env


# --------------------------------------------------------------------------- network


def assert_imds_is_local(netns: str) -> None:
    """Before any connection to 169.254.169.254: it is an address of `netns` (a namespace
    this session made), and `netns` has no route off this machine, so nothing can reach a
    real instance metadata service from it."""
    (route,) = json.loads(ip("-n", netns, "-j", "route", "get", IMDS_ADDRESS).stdout)
    assert route.get("type") == "local", f"{IMDS_ADDRESS} is not local in {netns}: {route}"
    for outside in ("8.8.8.8", "192.0.2.1"):
        routed = ip("-n", netns, "route", "get", outside, check=False)
        assert routed.returncode != 0, f"{netns} has a route off the machine: {routed.stdout}"


def add_local_address(netns: str, address: str) -> None:
    """`address`/32 on `lo` of `netns` (this kernel may have no dummy link type)."""
    ip("-n", netns, "addr", "add", f"{address}/32", "dev", "lo")


# --------------------------------------------------------------------------- podman


class RuntimeService:
    """`podman system service` on a Unix socket: the Docker Engine API the broker asks
    about containers. `stop()` and `start()` for the runtime-down test; stopped on exit."""

    def __init__(self, host: ContainerHost):
        self.host = host
        self.socket = host.workdir / "podman.sock"
        self.log = host.workdir / "podman-service.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.host.podman_argv(), "system", "service", "--time=0", f"unix://{self.socket}"],
                env=self.host.podman_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while True:
            try:
                if self.get("/_ping", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"podman system service did not answer on {self.socket}:\n{log}")
            time.sleep(POLL_INTERVAL_S)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT_S)
            self.proc = None
        # podman removes its socket on SIGTERM; a kill leaves it (connection refused).
        self.socket.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, timeout: float = 10) -> tuple[int, object]:
        """GET `path` of the Docker Engine API: (status, JSON body or text)."""
        conn = _UnixHTTPConnection(str(self.socket), timeout)
        try:
            conn.request("GET", path, headers={"Host": "d"})
            response = conn.getresponse()
            body = response.read().decode()
            try:
                return response.status, json.loads(body)
            except json.JSONDecodeError:
                return response.status, body
        finally:
            conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class Container:
    """One running container; `exec` runs a command in it as a given uid."""

    host: ContainerHost = field(repr=False)
    name: str
    id: str
    # Its address on the session's bridge; None with --network host / ns:.
    ip: str | None
    image: str | None
    labels: dict[str, str]
    # What the broker's audit events must say about it (see ContainerHost.run).
    audit_fields: dict[str, str] = field(default_factory=dict)
    removed: bool = False

    @property
    def cgroup(self) -> str:
        """Its cgroup v2 path, as the broker reports it."""
        return f"{PODMAN_CGROUP_PARENT}/libpod-{self.id}"

    def exec(
        self,
        argv: Sequence[str],
        *,
        uid: int = 0,
        env: dict[str, str] | None = None,
        timeout: float = CLIENT_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """`podman exec` as uid:uid (no supplementary groups) with `env` (and podman's own
        `container`, `HOSTNAME`); the process joins the container's cgroup and network
        namespace."""
        env_args = [f"--env={key}={value}" for key, value in (env or {}).items()]
        return self.host.podman(
            "exec", f"--user={uid}:{uid}", "--workdir=/tmp", *env_args, self.id, *argv, timeout=timeout, check=False
        )

    def whoami(self, client: Client, uid: int) -> subprocess.CompletedProcess[str]:
        """A real SDK client (harness.CLIENTS) as uid, IMDS at its built-in default."""
        return self.exec(client.argv, uid=uid, env=container_env(self.host.sts_endpoint))

    def probe(self, uid: int, *args: str) -> dict:
        """clients/identity_probe.py against http://169.254.169.254 as uid (see there for
        args); its JSON report. Fails if the connection cannot be made."""
        return self._report("identity_probe.py", uid, args)

    def attempt(self, uid: int, *args: str, timeout: float = 10) -> dict:
        """Like probe, but a connection that cannot be made within `timeout` is the report
        {"error": ...} (clients/attempt_probe.py): for callers that must not get through."""
        return self._report("attempt_probe.py", uid, args, ["--timeout", str(timeout)])

    def _report(self, script: str, uid: int, args: Sequence[str], options: Sequence[str] = ()) -> dict:
        argv = [str(PYTHON), str(CLIENTS_DIR / script), *options, IMDS_DEFAULT_ENDPOINT, *args]
        result = self.exec(argv, uid=uid, env=container_env(self.host.sts_endpoint))
        assert result.returncode == 0, describe(result)
        return json.loads(result.stdout)

    def root(self, script: str) -> subprocess.CompletedProcess[str]:
        """`sh -c script` as root in the container; must succeed."""
        result = self.exec(["sh", "-c", script], uid=0, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert result.returncode == 0, describe(result)
        return result

    def remove(self) -> None:
        if not self.removed:
            self.host.podman("rm", "--force", "--time=0", self.id)
            self.removed = True


@dataclass
class ContainerHost:
    """Podman in the session's host namespace H, with its bridge network, image, runtime
    API and moto; see the module docstring. Make it with `container_host()`."""

    workdir: Path
    netns: str
    network: str  # the CNI network's (unique) name
    rootfs: Path
    runtime: RuntimeService = field(init=False)
    moto: Server | None = None
    containers: list[Container] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.runtime = RuntimeService(self)

    @property
    def sts_endpoint(self) -> str:
        assert self.moto is not None
        return self.moto.endpoint

    # -- podman

    def podman_env(self) -> dict[str, str]:
        return hermetic_env(
            CONTAINERS_CONF=str(self.workdir / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(self.workdir / "storage.conf"),
        )

    def podman_argv(self) -> list[str]:
        """podman, run in H, on the session's storage and config only."""
        return [
            *netns_enter(self.netns),
            str(PODMAN),
            "--root", str(self.workdir / "storage"),
            "--runroot", str(self.workdir / "run"),
            "--tmpdir", str(self.workdir / "tmp"),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--runtime", "runc",
            "--events-backend", "file",
            "--network-backend", "cni",
        ]  # fmt: skip

    def podman(
        self, *args: str, timeout: float = PODMAN_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.podman_argv(), *args],
            env=self.podman_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman failed\n{describe(result)}")
        return result

    def tag(self, name: str) -> str:
        """Another name for the session's image (e.g. to match a `container_image` glob)."""
        self.podman("tag", IMAGE, name)
        return name

    def run(
        self,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        ip: str | None = None,
        network: str | None = None,
        cap_add: Sequence[str] = (),
        image: str | None = IMAGE,
    ) -> Container:
        """Start a detached container (`sleep`, until removed) and return it.

        network: None for the session's bridge, "host" for H's own namespace, or
        "ns:/run/netns/NAME". image=None runs it from the root file system (`--rootfs`)
        instead of an image, which the runtime reports with an empty image."""
        name = name or f"imdsb-{secrets.token_hex(4)}"
        labels = labels or {}
        args = ["run", "--detach", f"--name={name}", "--tmpfs=/tmp:mode=1777", "--pull=never"]
        args.append(f"--network={network or self.network}")
        if ip is not None:
            args.append(f"--ip={ip}")
        args += [f"--label={key}={value}" for key, value in labels.items()]
        args += [f"--cap-add={cap}" for cap in cap_add]
        args += [f"--volume={path}:{path}:ro" for path in self.bind_mounts()]
        args += [image] if image is not None else ["--rootfs", str(self.rootfs)]
        args += ["sleep", str(CONTAINER_LIFETIME_S)]
        created = self.podman(*args)
        container_id = created.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f]{64}", container_id), describe(created)
        container = Container(self, name, container_id, None, image, labels)
        self.containers.append(container)
        info = self.inspect(container_id)
        # As the Docker Engine API says it (Name without its "/", Config.Image): see
        # test_containers.py's plumbing test, which compares the two.
        container.audit_fields = {
            "container_id": container_id,
            "container_name": info["Name"],
            "container_image": info["ImageName"],
            "container_engine": "podman",
        }
        if network is None:
            networks = info["NetworkSettings"]["Networks"]
            container.ip = networks[self.network]["IPAddress"]
            assert ip is None or container.ip == ip, networks
        return container

    def inspect(self, ref: str) -> dict:
        (info,) = json.loads(self.podman("inspect", "--type=container", ref).stdout)
        return info

    def bind_mounts(self) -> list[str]:
        """Host paths mounted read-only at the same path in every container."""
        paths = [Path("/usr"), Path("/etc/ssl")]
        # Merged /usr: /bin, /lib... are symlinks in the root fs; otherwise mounted here.
        paths += [Path("/", d) for d in MERGED_DIRS if Path("/", d).is_dir() and not Path("/", d).is_symlink()]
        paths += [PYTHON.parent.parent, CLIENTS_DIR, JS_DIR, RUST_WHOAMI_BIN]
        node = Path(NODE).resolve()
        if not node.is_relative_to("/usr"):
            paths.append(node.parent)
        return [str(p) for p in paths if p.exists()]

    def remove_all(self) -> None:
        for container in self.containers:
            try:
                container.remove()
            except (AssertionError, subprocess.TimeoutExpired):
                pass
        # Anything else made with this storage, e.g. by a test that failed half-way.
        self.podman("rm", "--all", "--force", "--time=0", check=False)


MERGED_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def build_rootfs(rootfs: Path, uids: Sequence[int]) -> None:
    """A minimal root file system: mount points, /bin etc. as the host has them (symlinks
    into /usr on a merged-/usr host), and passwd/group entries for the client uids."""
    for directory in ("proc", "sys", "dev", "tmp", "etc", "run", "root", "usr", "var/tmp"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    for name in MERGED_DIRS:
        host = Path("/", name)
        if host.is_symlink():
            (rootfs / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (rootfs / name).mkdir()
    passwd = ["root:x:0:0:root:/root:/bin/sh"] + [f"u{uid}:x:{uid}:{uid}::/tmp:/bin/sh" for uid in uids]
    group = ["root:x:0:"] + [f"u{uid}:x:{uid}:" for uid in uids]
    (rootfs / "etc/passwd").write_text("\n".join(passwd) + "\n")
    (rootfs / "etc/group").write_text("\n".join(group) + "\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n")


def rootfs_tar(rootfs: Path, dest: Path) -> Path:
    with tarfile.open(dest, mode="w") as tar:
        tar.add(rootfs, arcname=".")
    return dest


def cni_conflist(network: str, ipam_dir: Path) -> dict:
    """The session's bridge network. What `podman network create --disable-dns --subnet`
    writes, minus ipMasq and the firewall/portmap plugins (nothing here leaves H, so no
    iptables rule is needed, and CNI's masquerade teardown fails for a container that added
    an address of its own), and with the IPAM leases under the session's directory."""
    return {
        "cniVersion": "0.4.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                },
                "capabilities": {"ips": True},
            },
            {"type": "tuning"},
        ],
    }


@contextmanager
def container_host(uids: Sequence[int]) -> Iterator[ContainerHost]:
    """H with podman, its bridge network, image, runtime API and moto; see the module
    docstring. Everything is removed on exit, failure included.

    Raises PermissionError when this machine does not let us create a network namespace."""
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="imdsb-ctr-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        netns = stack.enter_context(network_namespace("imdsb-ch"))
        add_local_address(netns, IMDS_ADDRESS)
        add_local_address(netns, MOTO_ADDRESS)
        assert_imds_is_local(netns)

        network = f"imdsb-{os.getpid()}-{secrets.token_hex(3)}"
        for sub in ("storage", "run", "tmp", "cni", "ipam"):
            (workdir / sub).mkdir()
        (workdir / "containers.conf").write_text(
            CONTAINERS_CONF.format(tmp_dir=workdir / "tmp", cni_dir=workdir / "cni")
        )
        (workdir / "storage.conf").write_text(
            STORAGE_CONF.format(graphroot=workdir / "storage", runroot=workdir / "run")
        )
        conflist = cni_conflist(network, workdir / "ipam")
        (workdir / "cni" / f"{network}.conflist").write_text(json.dumps(conflist, indent=1))
        stack.callback(_sweep_cni_results, network)
        rootfs = workdir / "rootfs"
        build_rootfs(rootfs, uids)

        host = ContainerHost(workdir, netns, network, rootfs)
        # Containers go before the namespace (a --network host one lives in it).
        stack.callback(host.remove_all)
        host.podman("import", "--change", 'CMD ["/bin/sh"]', str(rootfs_tar(rootfs, workdir / "rootfs.tar")), IMAGE)
        listed = host.podman("network", "ls", "--format", "{{.Name}}").stdout.split()
        assert network in listed, f"podman does not see the session's CNI network {network}: {listed}"

        stack.callback(host.runtime.stop)
        host.runtime.start()
        host.moto = stack.enter_context(
            serving(
                "moto",
                [*netns_enter(netns), str(PYTHON), str(CLIENTS_DIR / "moto_sts.py"), MOTO_ADDRESS],
                hermetic_env(),
                workdir / "moto",
            )
        )
        yield host


def _sweep_cni_results(network: str) -> None:
    """libcni's cache entries of this session's network (normally gone with each container)."""
    for entry in Path("/var/lib/cni/results").glob(f"{network}-*"):
        entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- broker


@dataclass(frozen=True)
class ContainerRule:
    """One `[[app]]` whose role is named after it; `match` may hold container_label (a
    table of label -> glob), container_name, container_image, and any host key."""

    name: str
    match: dict[str, int | str | list[str] | dict[str, str]]

    @property
    def role_arn(self) -> str:
        return f"arn:aws:iam::{ACCOUNT_ID}:role/{self.name}"

    @property
    def assumed_role_arn_re(self) -> str:
        return rf"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{re.escape(self.name)}/\S+"

    def toml(self) -> str:
        entries = "".join(f"{key} = {_toml(value)}\n" for key, value in self.match.items())
        return f'\n[[app]]\nname = "{self.name}"\nrole_arn = "{self.role_arn}"\n[app.match]\n{entries}'


def _toml(value: int | str | list[str] | dict[str, str]) -> str:
    # JSON strings of printable ASCII are TOML basic strings; keys are quoted, since a label
    # name like com.example.app would otherwise be a dotted key.
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    return json.dumps(value)


@dataclass(frozen=True)
class ContainerBroker:
    server: Server
    config: Path
    audit: AuditFile

    def verify_audit(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BROKER_BIN), "audit", "verify", str(self.audit.path)], capture_output=True, text=True, timeout=30
        )


def container_broker_config(
    host: ContainerHost,
    state_dir: Path,
    rules: Sequence[ContainerRule],
    *,
    runtime_socket: Path | None = None,
    containers: bool = True,
    hop_limit: int | None = 1,
) -> str:
    """The broker's config: IMDS on 169.254.169.254:80, STS at the session's moto, a
    `[containers]` section naming the runtime API (unless containers=False)."""
    hop = "" if hop_limit is None else f"hop_limit = {hop_limit}\n"
    section = ""
    if containers:
        section = f'\n[containers]\nruntime_socket = "{runtime_socket or host.runtime.socket}"\n'
    return f"""\
[server]
listen = ["{IMDS_ADDRESS}:80"]
imdsv1 = "disabled"
state_dir = "{state_dir}"
{hop}
[sts]
region = "{REGION}"
endpoint_url = "{host.sts_endpoint}"
{section}{"".join(rule.toml() for rule in rules)}"""


def imds_port_taken(host: ContainerHost) -> bool:
    """Whether something in H listens on 169.254.169.254:80 already (a broker)."""
    listening = subprocess.run(
        [*netns_enter(host.netns), "ss", "-Hltn", "src", f"{IMDS_ADDRESS}:80"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return bool(listening.stdout.strip())


@contextmanager
def serve_container_broker(
    host: ContainerHost, workdir: Path, rules: Sequence[ContainerRule], **config: object
) -> Iterator[ContainerBroker]:
    """The broker in H on 169.254.169.254:80 (JSON logs; audit file in its state dir);
    `config` goes to container_broker_config."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir / "imds-broker.toml", container_broker_config(host, workdir / "state", rules, **config))
    assert_imds_is_local(host.netns)
    with serve_broker(workdir, path, launcher=netns_enter(host.netns), log_format="json") as server:
        yield ContainerBroker(server, path, AuditFile(workdir / "state" / "audit.log"))


# --------------------------------------------------------------------------- routed


@dataclass(frozen=True)
class Routed:
    client: str  # the namespace to run a container in: --network ns:/run/netns/CLIENT
    router: str


def time_exceeded_sent(netns: str) -> int:
    """How many ICMP time-exceeded messages `netns` has sent (Icmp: OutTimeExcds)."""
    text = subprocess.run(
        [*netns_enter(netns), "cat", "/proc/net/snmp"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    header, values = [line.split() for line in text.splitlines() if line.startswith("Icmp:")][:2]
    return int(values[header.index("OutTimeExcds")])


@contextmanager
def routed_client_namespace(host: ContainerHost) -> Iterator[Routed]:
    """A client namespace one router away from H (for `--network ns:/run/netns/NAME`):

        client ns ROUTED_CLIENT --veth-- router ns (forwarding) --veth-- ROUTED_HOST_SIDE H

    The client's default route goes via the router, whose own goes to H, where
    169.254.169.254 is local. Removed on exit (the veth in H with it)."""
    with ExitStack() as stack:
        router = stack.enter_context(network_namespace("imdsb-cr"))
        client = stack.enter_context(network_namespace("imdsb-cc"))
        # H:imdsb-a <-> router:imdsb-b, router:imdsb-a <-> client:imdsb-b
        connect_namespaces(host.netns, ROUTED_HOST_SIDE, router, [ROUTED_ROUTER_HOST_SIDE])
        stack.callback(ip, "-n", host.netns, "link", "del", "imdsb-a", check=False)
        connect_namespaces(router, ROUTED_ROUTER_CLIENT_SIDE, client, [ROUTED_CLIENT])
        ip("-n", client, "route", "add", "default", "via", ROUTED_ROUTER_CLIENT_SIDE)
        ip("-n", router, "route", "add", "default", "via", ROUTED_HOST_SIDE)
        ip("-n", host.netns, "route", "add", ROUTED_CLIENT_NET, "via", ROUTED_ROUTER_HOST_SIDE)
        subprocess.run([*netns_enter(router), "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, timeout=30)
        # The path leads to H and ends there: the router's next hop is H's end of the veth.
        (route,) = json.loads(ip("-n", router, "-j", "route", "get", IMDS_ADDRESS).stdout)
        assert route.get("gateway") == ROUTED_HOST_SIDE, route
        (local,) = json.loads(ip("-n", host.netns, "-j", "route", "get", IMDS_ADDRESS).stdout)
        assert local.get("type") == "local", local
        yield Routed(client, router)
