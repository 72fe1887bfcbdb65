"""The system-service pieces: the systemd units verify, and deploy/imds-network.sh sets up
and tears down both ways of putting the broker where SDKs look, inside network namespaces
the tests create:

- local: 169.254.169.254 on the host (dummy interface, or lo), the broker bound to it, and
  boto3 and the aws CLI with no endpoint configured get their role;
- ec2: an nftables redirect sends every uid's IMDS traffic to the broker except the broker
  user's, which still reaches the (here: stand-in) real IMDS; with the broker down, apps get
  "connection refused", never the real IMDS.
"""

import gzip
import re
import shutil
import subprocess
from contextlib import ExitStack

import pytest

from harness import (
    APP_A,
    CLIENTS,
    CLIENTS_DIR,
    PYTHON,
    REPO_ROOT,
    ROLE_LISTING_PATH,
    UNMAPPED_UID,
    BROKER_BIN,
    Callers,
    describe,
    hermetic_env,
    ip,
    netns_exec,
    network_namespace,
    run_as,
    serving,
    start_broker,
    start_moto,
)

SCRIPT = REPO_ROOT / "deploy" / "imds-network.sh"
# imds-broker(8) and one page per subcommand, as deploy/install.sh installs them.
MAN_PAGES = [
    "imds-broker",
    *(
        f"imds-broker-{sub}"
        for sub in (
            "audit", "audit-keygen", "audit-verify", "check", "doctor", "exec", "explain", "lint", "serve",
            "status", "token", "token-rotate",
        )
    ),
]
IMDS = "169.254.169.254"
CLI_CLIENTS = [c for c in CLIENTS if c.name in ("boto3", "awscli")]


def network_script(netns: str, *args: str) -> str:
    result = subprocess.run(
        [*netns_exec(netns), "bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, describe(result)
    return result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(built, tmp_path):
    # Point the units at this checkout's files: verify checks that every command exists.
    for unit in (REPO_ROOT / "systemd").glob("*.service"):
        text = unit.read_text()
        text = text.replace("/usr/bin/imds-broker", str(BROKER_BIN))
        text = text.replace("/usr/lib/imds-broker/imds-network.sh", str(SCRIPT))
        (tmp_path / unit.name).write_text(text)
    # Each drop-in, applied: its lines must be valid in the unit too.
    broker = tmp_path / "imds-broker.service"
    unit = broker.read_text()
    assert unit.count("[Install]") == 1, f"{broker.name}: expected one [Install] section to insert a drop-in before"
    for name in ("container-endpoint", "containers"):
        dropin = (REPO_ROOT / "deploy" / f"{name}.conf").read_text()
        body = "".join(line + "\n" for line in dropin.splitlines() if not line.startswith(("#", "[Service]")))
        (tmp_path / f"imds-broker-with-{name}.service").write_text(unit.replace("[Install]", body + "\n[Install]"))
    units = sorted(str(p) for p in tmp_path.glob("*.service"))
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, describe(result)
    assert result.stderr.strip() == "", describe(result)


def test_local_mode_serves_zero_config_clients_and_tears_down(built, client_homes, tmp_path):
    with network_namespace() as netns:
        out = network_script(netns, "up", "--mode", "local")
        up = ip("-n", netns, "-br", "addr").stdout
        assert IMDS in up and "169.254.170.23" in up, out
        with ExitStack() as stack:
            moto = stack.enter_context(start_moto(tmp_path / "moto", netns=netns))
            stack.enter_context(
                start_broker(tmp_path / "broker", sts_endpoint=moto.endpoint, listen=f"{IMDS}:80", netns=netns)
            )
            callers = Callers(client_homes, sts_endpoint=moto.endpoint, imds_endpoint=None, netns=netns)
            for client in CLI_CLIENTS:
                result = callers.whoami(client, APP_A.uid)
                assert result.returncode == 0, describe(result)
                assert re.fullmatch(APP_A.assumed_role_arn_re, result.stdout.strip()), describe(result)
        network_script(netns, "down", "--mode", "local")
        addresses = ip("-n", netns, "-br", "addr").stdout
        for address in (IMDS, "fd00:ec2::254", "169.254.170.23", "fd00:ec2::23"):
            assert address not in addresses, addresses
        assert "imds0" not in ip("-n", netns, "link").stdout


CONNECT_SNIPPET = """
import socket
try:
    socket.create_connection(("169.254.169.254", 80), timeout=5).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(f"error {e}")
"""


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (nftables) is not installed")
def test_ec2_mode_redirects_every_uid_but_the_broker_user_and_fails_closed(built, client_homes, tmp_path):
    broker_user = UNMAPPED_UID  # stands for the daemon's own user
    with ExitStack() as stack:
        host = stack.enter_context(network_namespace("imdsb-host"))
        ec2 = stack.enter_context(network_namespace("imdsb-ec2"))
        # host <-veth-> ec2, which holds the "real" IMDS address behind its end of the link.
        ip("link", "add", "imdsb-h", "netns", host, "type", "veth", "peer", "name", "imdsb-e", "netns", ec2)
        ip("-n", host, "addr", "add", "10.231.0.1/24", "dev", "imdsb-h")
        ip("-n", ec2, "addr", "add", "10.231.0.2/24", "dev", "imdsb-e")
        ip("-n", host, "link", "set", "imdsb-h", "up")
        ip("-n", ec2, "link", "set", "imdsb-e", "up")
        ip("-n", ec2, "addr", "add", f"{IMDS}/32", "dev", "lo")
        ip("-n", host, "route", "add", f"{IMDS}/32", "via", "10.231.0.2")
        real = [*netns_exec(ec2), str(PYTHON), str(CLIENTS_DIR / "fake_ec2_imds.py"), IMDS, "80"]
        stack.enter_context(serving("real-imds", real, hermetic_env(), tmp_path / "real"))
        moto = stack.enter_context(start_moto(tmp_path / "moto", netns=host))
        callers = Callers(client_homes, sts_endpoint=moto.endpoint, imds_endpoint=None, netns=host)

        with start_broker(tmp_path / "broker", sts_endpoint=moto.endpoint, netns=host) as broker:
            port = broker.addresses[0].rsplit(":", 1)[1]
            network_script(host, "up", "--mode", "ec2", "--broker-port", port, "--broker-user", str(broker_user))

            token, listing = callers.probe(APP_A.uid, ROLE_LISTING_PATH)
            assert token["status"] == 200 and token["body"] != "real-imds-token", token
            assert (listing["status"], listing["body"]) == (200, APP_A.name), listing
            boto3 = next(c for c in CLIENTS if c.name == "boto3")
            result = callers.whoami(boto3, APP_A.uid)
            assert re.fullmatch(APP_A.assumed_role_arn_re, result.stdout.strip()), describe(result)

            (own,) = callers.probe(broker_user)
            assert own["body"] == "real-imds-token", "the broker's user must reach the real IMDS"

        # The broker is down: apps are refused, never sent to the real IMDS.
        result = run_as(APP_A.uid, [str(PYTHON), "-c", CONNECT_SNIPPET], callers.env(APP_A.uid), netns=host)
        assert result.stdout.strip() == "refused", describe(result)

        network_script(host, "down", "--mode", "ec2")
        listed = subprocess.run(
            [*netns_exec(host), "nft", "list", "table", "inet", "imds_broker"], capture_output=True, text=True
        )
        assert listed.returncode != 0, "the nftables table is gone after down"
        (direct,) = callers.probe(APP_A.uid)
        assert direct["body"] == "real-imds-token", "without the redirect, traffic reaches the real IMDS again"


def test_install_script_stages_every_file_and_keeps_an_existing_config(built, tmp_path):
    def install() -> None:
        result = subprocess.run(
            ["bash", str(REPO_ROOT / "deploy" / "install.sh"), "--binary", str(BROKER_BIN)],
            env={**hermetic_env(), "DESTDIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, describe(result)

    install()
    expected = {
        "usr/bin/imds-broker": 0o755,
        "usr/lib/imds-broker/imds-network.sh": 0o755,
        "lib/systemd/system/imds-broker.service": 0o644,
        "lib/systemd/system/imds-broker-network.service": 0o644,
        "etc/imds-broker/config.toml": 0o640,
        "etc/imds-broker/apps.d": 0o755,
        "usr/share/doc/imds-broker/README.md": 0o644,
        "usr/share/doc/imds-broker/config.example.toml": 0o644,
        "usr/share/bash-completion/completions/imds-broker": 0o644,
        "usr/share/zsh/vendor-completions/_imds-broker": 0o644,
        "usr/share/fish/vendor_completions.d/imds-broker.fish": 0o644,
        **{f"usr/share/man/man8/{page}.8.gz": 0o644 for page in MAN_PAGES},
    }
    for path, mode in expected.items():
        assert (tmp_path / path).stat().st_mode & 0o777 == mode, path
    man8 = tmp_path / "usr/share/man/man8"
    assert sorted(p.name for p in man8.iterdir()) == sorted(f"{page}.8.gz" for page in MAN_PAGES)
    for page in MAN_PAGES:
        text = gzip.decompress((man8 / f"{page}.8.gz").read_bytes()).decode()
        assert f".TH {page} 8" in text, page
    config = tmp_path / "etc/imds-broker/config.toml"
    # The shipped example is a valid config, so the unit's ExecStartPre check passes as is.
    check = subprocess.run(
        [str(BROKER_BIN), "check", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, describe(check)
    # Reinstalling never replaces the operator's config.
    config.write_text("# the operator's own\n")
    install()
    assert config.read_text() == "# the operator's own\n"
