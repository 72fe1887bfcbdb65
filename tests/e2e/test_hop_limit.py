"""Hop limit: everything the broker sends leaves with IP TTL / IPv6 hop limit
`[server] hop_limit` (default 1), the SYN-ACK included. A caller one router away (a
container behind NAT, another host) cannot even complete the TCP handshake unless the
operator raises it; a caller on the broker's own link is served.

All in network namespaces this module creates, over IPv4 and IPv6:

    client ns  CLIENT --veth-- ROUTER_CLIENT_SIDE  router ns  ROUTER_BROKER_SIDE --veth-- BROKER  broker ns
                                        (forwarding on)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    BROKER_BIN,
    PYTHON,
    Server,
    connect_namespaces,
    describe,
    hermetic_env,
    ip,
    netns_enter,
    netns_exec,
    network_namespace,
    serve_broker,
    write_config,
)


@dataclass(frozen=True)
class Family:
    name: str
    client: str
    router_client_side: str
    router_broker_side: str
    broker: str
    client_net: str
    broker_net: str
    # The router's counter of ICMP "time exceeded" messages it sent (/proc/net/snmp*).
    snmp_file: str
    time_exceeded_counter: str


IPV4 = Family(
    "ipv4",
    client="10.201.1.2",
    router_client_side="10.201.1.1",
    router_broker_side="10.201.2.1",
    broker="10.201.2.2",
    client_net="10.201.1.0/24",
    broker_net="10.201.2.0/24",
    snmp_file="/proc/net/snmp",
    time_exceeded_counter="Icmp:OutTimeExcds",
)
IPV6 = Family(
    "ipv6",
    client="fd00:201:1::2",
    router_client_side="fd00:201:1::1",
    router_broker_side="fd00:201:2::1",
    broker="fd00:201:2::2",
    client_net="fd00:201:1::/64",
    broker_net="fd00:201:2::/64",
    snmp_file="/proc/net/snmp6",
    time_exceeded_counter="Icmp6OutTimeExcds",
)
FAMILIES = (IPV4, IPV6)

# A handshake on a veth takes microseconds; the client retransmits its SYN after 1 s, so
# a refused handshake is seen to stay refused.
CONNECT_TIMEOUT_S = 3
CLIENT_RUN_TIMEOUT_S = 30

# One token PUT, the cheapest request that proves a connection was served. Prints
# {"status": N} or {"error": "<exception class>"}.
PROBE = """
import http.client, json, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=timeout)
try:
    conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    print(json.dumps({"status": conn.getresponse().status}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__}))
finally:
    conn.close()
"""


@dataclass(frozen=True)
class Topology:
    client: str
    router: str
    broker: str


@dataclass(frozen=True)
class Broker:
    server: Server

    def port(self, family: Family) -> int:
        # `listening on` lines come in config order; the port is what follows the last ':'.
        (address,) = [a for a in self.server.addresses if family.broker in a]
        return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    if not BROKER_BIN.exists():
        pytest.fail(f"not built: {BROKER_BIN}; run tests/run-all.sh")
    with ExitStack() as stack:
        try:
            client = stack.enter_context(network_namespace("imdsb-hc"))
        except PermissionError as err:
            pytest.skip(f"this machine does not let the suite create a network namespace: {err}")
        router = stack.enter_context(network_namespace("imdsb-hr"))
        broker = stack.enter_context(network_namespace("imdsb-hb"))
        # client:imdsb-a <-> router:imdsb-b, router:imdsb-a <-> broker:imdsb-b
        connect_namespaces(client, IPV4.client, router, [IPV4.router_client_side])
        connect_namespaces(router, IPV4.router_broker_side, broker, [IPV4.broker])
        for netns, device, address in (
            (client, "imdsb-a", IPV6.client),
            (router, "imdsb-b", IPV6.router_client_side),
            (router, "imdsb-a", IPV6.router_broker_side),
            (broker, "imdsb-b", IPV6.broker),
        ):
            # nodad: usable at once, not after duplicate address detection.
            ip("-n", netns, "addr", "add", f"{address}/64", "dev", device, "nodad")
        for family in FAMILIES:
            ip("-n", client, "route", "add", family.broker_net, "via", family.router_client_side)
            ip("-n", broker, "route", "add", family.client_net, "via", family.router_broker_side)
        for setting in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            subprocess.run([*netns_exec(router), "sysctl", "-qw", setting], check=True, timeout=30)
        yield Topology(client, router, broker)


@contextmanager
def broker(topology: Topology, workdir: Path, hop_limit: int | None) -> Iterator[Broker]:
    """The broker in its namespace on both families' addresses; `hop_limit=None` leaves
    the key out, so the default is what is tested."""
    workdir.mkdir(parents=True, exist_ok=True)
    hop_line = "" if hop_limit is None else f"hop_limit = {hop_limit}"
    config = write_config(
        workdir / "imds-broker.toml",
        f"""\
[server]
listen = ["{IPV4.broker}:0", "[{IPV6.broker}]:0"]
state_dir = "{workdir / "state"}"
{hop_line}

[sts]
region = "us-east-1"
# Never called: nothing here asks for credentials. Loopback of the broker's namespace.
endpoint_url = "http://127.0.0.1:9"

[[app]]
name = "routed"
role_arn = "arn:aws:iam::111122223333:role/routed"
[app.match]
source = ["{IPV4.client_net}", "{IPV6.client_net}"]
""",
    )
    with serve_broker(workdir, config, launcher=netns_enter(topology.broker)) as server:
        server.wait_listening(count=2)
        yield Broker(server)


@pytest.fixture(scope="module")
def default_broker(topology, tmp_path_factory) -> Iterator[Broker]:
    with broker(topology, tmp_path_factory.mktemp("hop-default"), hop_limit=None) as b:
        yield b


@pytest.fixture(scope="module")
def two_hop_broker(topology, tmp_path_factory) -> Iterator[Broker]:
    with broker(topology, tmp_path_factory.mktemp("hop-2"), hop_limit=2) as b:
        yield b


def probe(netns: str, family: Family, port: int) -> dict:
    result = subprocess.run(
        [*netns_enter(netns), str(PYTHON), "-c", PROBE, family.broker, str(port), str(CONNECT_TIMEOUT_S)],
        env=hermetic_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_RUN_TIMEOUT_S,
        check=False,  # the assertion below shows what the probe printed
    )
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def time_exceeded_sent(netns: str, family: Family) -> int:
    """How many ICMP(v6) time-exceeded messages the namespace has sent."""
    text = subprocess.run(
        [*netns_enter(netns), "cat", family.snmp_file], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    if family is IPV6:  # "Name value" per line
        counters = dict(line.split() for line in text.splitlines() if line.strip())
        return int(counters[family.time_exceeded_counter])
    # /proc/net/snmp: a header line and a value line per protocol.
    protocol, name = family.time_exceeded_counter.split(":")
    lines = [line.split() for line in text.splitlines() if line.startswith(f"{protocol}:")]
    header, values = lines[0], lines[1]
    return int(values[header.index(name)])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_default_hop_limit_keeps_a_routed_caller_out(topology, default_broker, family):
    before = time_exceeded_sent(topology.router, family)

    outcome = probe(topology.client, family, default_broker.port(family))

    # No answer at all: not refused, not reset. The client's SYN got through; the
    # SYN-ACK (hop limit 1) expired at the router, which said so to the broker.
    assert outcome == {"error": "TimeoutError"}, outcome
    assert time_exceeded_sent(topology.router, family) > before


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_default_hop_limit_serves_a_caller_on_the_same_link(topology, default_broker, family):
    # The router namespace is on the broker's link: zero routers in between.
    assert probe(topology.router, family, default_broker.port(family)) == {"status": 200}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_hop_limit_2_lets_the_routed_caller_in(topology, two_hop_broker, family):
    assert probe(topology.client, family, two_hop_broker.port(family)) == {"status": 200}
