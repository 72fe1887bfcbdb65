"""Containers as first-class callers: with `[containers]`, a caller in a podman container is
found in the network namespace that holds its address, recognised from its cgroup
(`/libpod_parent/libpod-<id>`), and described by the runtime's API (name, image, labels),
so `container_label`, `container_name` and `container_image` rules can give it its role.

Real containers (rootful podman, runc, a CNI bridge) with the real SDKs inside, none of them
told where IMDS is: see containers.py for the layout. The broker's rules, tried in order:

    any-podman  cgroup /libpod_parent/libpod-* and uid UID_C   (needs no runtime API)
    billing     container_label com.example.app = billing
    reports     container_label com.example.app = reports
    forger      container_name imdsb-forger-*
    imaged      container_image localhost/imdsb-e2e/imaged:*
    host-uid    uid UID_B only: a host rule, which no container may ever match

The `test_plumbing_*` tests check the machinery against any daemon (a `source` rule for the
bridge's subnet, no `[containers]`), so a failure there is the setup's, not the feature's;
they come first, as their broker needs 169.254.169.254:80 before the module's takes it.

Run as root from the repo: `.venv/bin/python -m pytest tests/e2e/test_containers.py` (~30 s).
Skipped without podman unless CI is set; `.ci/run` installs podman, runc and the CNI plugins.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
import time

import pytest

from containers import (
    CONTAINER_CGROUP_GLOB,
    IMAGE,
    SUBNET,
    Container,
    ContainerHost,
    ContainerRule,
    container_host,
    imds_port_taken,
    podman_missing_reason,
    routed_client_namespace,
    serve_container_broker,
    time_exceeded_sent,
)
from harness import BROKER_BIN, CLIENT_TIMEOUT_S, CLIENT_UIDS, CLIENTS, ROLE_LISTING_PATH, describe, netns_enter

PODMAN_PROBLEM = podman_missing_reason()
# Skipped only on a developer's machine without podman; in CI its absence is a failure.
pytestmark = pytest.mark.skipif(
    PODMAN_PROBLEM is not None and not os.environ.get("CI"), reason=f"{PODMAN_PROBLEM} (CI unset)"
)

UID_A, UID_B, UID_C = CLIENT_UIDS
LABEL = "com.example.app"

ANY_PODMAN = ContainerRule("any-podman", {"cgroup": CONTAINER_CGROUP_GLOB, "uid": UID_C})
BILLING = ContainerRule("billing", {"container_label": {LABEL: "billing"}})
REPORTS = ContainerRule("reports", {"container_label": {LABEL: "reports"}})
FORGER = ContainerRule("forger", {"container_name": "imdsb-forger-*"})
IMAGED = ContainerRule("imaged", {"container_image": "localhost/imdsb-e2e/imaged:*"})
HOST_UID = ContainerRule("host-uid", {"uid": UID_B})
RULES = (ANY_PODMAN, BILLING, REPORTS, FORGER, IMAGED, HOST_UID)

# Refusals of a token are logged as one of these, with reason `bad_token`.
DENIALS = {"credentials.denied", "token.rejected", "request.refused"}
# The caller events that must name the container.
CALLER_EVENTS = {"credentials.issued", "credentials.denied", "token.issued"}
HANDSHAKE_TIMEOUT_S = 3
# After the runtime API comes back, how long label matching may take to work again.
RUNTIME_RECOVERY_S = 10


@pytest.fixture(scope="module")
def host(built, client_homes) -> ContainerHost:
    # client_homes: root, and the client uids can use .venv, node_modules and the Rust client.
    if PODMAN_PROBLEM is not None:
        pytest.fail(f"CI is set and containers cannot run here: {PODMAN_PROBLEM}")
    try:
        with container_host(CLIENT_UIDS) as made:
            yield made
    except PermissionError as err:
        pytest.skip(f"this machine does not let the suite create a network namespace: {err}")


@pytest.fixture(scope="module")
def broker(host, tmp_path_factory):
    with serve_container_broker(host, tmp_path_factory.mktemp("containers-broker"), RULES, hop_limit=1) as served:
        yield served


@pytest.fixture(scope="module")
def labelled(host) -> dict[str, Container]:
    """One container per label app, on the bridge, for the whole module."""
    return {rule.name: host.run(labels={LABEL: rule.name}) for rule in (BILLING, REPORTS)}


def role_path(rule: ContainerRule) -> str:
    return ROLE_LISTING_PATH + rule.name


def token_of(report: dict) -> str:
    assert report["token"]["status"] == 200, report["token"]
    return report["token"]["body"]


def assert_own_role(report: dict, rule: ContainerRule) -> None:
    """The caller was answered as `rule`'s app: its token worked and the listing is the role."""
    token_of(report)
    listing = report["responses"][0]
    assert listing["path"] == ROLE_LISTING_PATH, report
    assert (listing["status"], listing["body"]) == (200, rule.name), listing


def assert_no_credentials(report: dict) -> None:
    """Nothing served: no token, or a token with which no role is listed or fetched."""
    if report["token"]["status"] != 200:
        return
    for response in report["responses"]:
        assert response["status"] in (401, 403, 404, 503), response
        assert "SecretAccessKey" not in response["body"], response


def peers(report: dict) -> list[str]:
    """The client addresses of every request in a probe report (the audit events' `peer`)."""
    return [r["local"] for r in [report["token"], *report["responses"]]]


# --------------------------------------------------------------------------- plumbing


def test_plumbing_runtime_api_describes_containers_as_the_audit_will(host):
    container = host.run(labels={LABEL: "billing"}, name=f"imdsb-plumb-{secrets.token_hex(3)}")

    status, info = host.runtime.get(f"/v1.41/containers/{container.id}/json")

    assert status == 200, info
    assert info["Id"] == container.id
    assert info["Config"]["Labels"] == {LABEL: "billing"}
    assert info["Name"].lstrip("/") == container.audit_fields["container_name"] == container.name
    assert info["Config"]["Image"] == container.audit_fields["container_image"] == IMAGE
    cgroup = container.root("cat /proc/self/cgroup").stdout
    assert f"0::{container.cgroup}\n" in cgroup, cgroup
    assert ipaddress.ip_address(container.ip) in ipaddress.ip_network(SUBNET)


def test_plumbing_sdks_in_a_container_find_the_default_imds_address(host, tmp_path):
    """Today's daemon, no [containers]: a container is a remote caller that a `source` rule
    for the bridge matches. Every SDK, told nothing about IMDS, reaches the broker through
    the gateway and moto through the same route."""
    if imds_port_taken(host):
        pytest.skip("the module's broker already holds 169.254.169.254:80: run the plumbing tests first (file order)")
    bridge = ContainerRule("bridge", {"source": [SUBNET]})
    container = host.run()
    with serve_container_broker(host, tmp_path / "broker", [bridge], containers=False):
        for client in CLIENTS:
            result = container.whoami(client, UID_A)

            assert result.returncode == 0, f"{client.name}\n{describe(result)}"
            assert re.fullmatch(bridge.assumed_role_arn_re, result.stdout.strip()), describe(result)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_containers_on_one_bridge_each_get_their_own_labels_role(host, broker, labelled, client):
    mark = broker.audit.mark()

    for rule in (BILLING, REPORTS):
        result = labelled[rule.name].whoami(client, UID_A)

        assert result.returncode == 0, f"{rule.name}\n{describe(result)}"
        assert re.fullmatch(rule.assumed_role_arn_re, result.stdout.strip()), describe(result)
        # One line per (caller, app, access key): the first client of this container wrote it.
        broker.audit.wait_for_some(0, event="credentials.issued", app=rule.name, **labelled[rule.name].audit_fields)


def test_container_without_a_matching_label_gets_nothing_not_even_a_host_rule(host, broker):
    # As uid UID_B, which the host-only rule `uid = UID_B` gives a role on the host.
    stranger = host.run(labels={LABEL: "unknown"})
    boto3 = next(c for c in CLIENTS if c.name == "boto3")
    mark = broker.audit.mark()

    result = stranger.whoami(boto3, UID_B)
    report = stranger.probe(UID_B, ROLE_LISTING_PATH, role_path(HOST_UID))

    assert result.returncode != 0, describe(result)
    assert re.search(boto3.no_credentials_re, result.stderr, re.MULTILINE), describe(result)
    listing, host_role = report["responses"]
    assert listing["status"] == 404, listing
    assert host_role["status"] == 404, host_role
    denied = broker.audit.wait_for_some(mark, event="credentials.denied", peer=listing["local"])
    assert all(event.get("container_id") == stranger.id for event in denied), denied


def test_host_network_container_is_matched_by_label_and_never_by_a_host_rule(host, broker):
    """--network host: its socket is in the broker's own namespace, like a host process's,
    but its cgroup still says which container it is."""
    billing = host.run(labels={LABEL: "billing"}, network="host")
    unlabelled = host.run(network="host")
    boto3 = next(c for c in CLIENTS if c.name == "boto3")
    mark = broker.audit.mark()

    result = billing.whoami(boto3, UID_A)
    stranger = unlabelled.probe(UID_B, ROLE_LISTING_PATH)

    assert result.returncode == 0, describe(result)
    assert re.fullmatch(BILLING.assumed_role_arn_re, result.stdout.strip()), describe(result)
    broker.audit.wait_for_some(mark, event="credentials.issued", app=BILLING.name, **billing.audit_fields)
    (listing,) = stranger["responses"]
    assert listing["status"] == 404, listing
    broker.audit.wait_for(mark, event="credentials.denied", peer=listing["local"], container_id=unlabelled.id)


def test_container_image_rule_matches_the_image_reference(host, broker):
    imaged = host.run(image=host.tag("localhost/imdsb-e2e/imaged:2"))
    mark = broker.audit.mark()

    report = imaged.probe(UID_A, ROLE_LISTING_PATH, role_path(IMAGED))

    assert_own_role(report, IMAGED)
    assert report["responses"][1]["status"] == 200, report["responses"][1]
    broker.audit.wait_for(
        mark, event="credentials.issued", peer=report["responses"][1]["local"], app=IMAGED.name, **imaged.audit_fields
    )
    assert imaged.audit_fields["container_image"] == "localhost/imdsb-e2e/imaged:2"


def test_recreated_container_is_matched_by_its_new_labels(host, broker):
    name = f"imdsb-reused-{secrets.token_hex(3)}"
    first = host.run(name=name, labels={LABEL: "billing"})
    assert_own_role(first.probe(UID_A, ROLE_LISTING_PATH), BILLING)
    first.remove()
    mark = broker.audit.mark()

    second = host.run(name=name, labels={LABEL: "reports"})
    report = second.probe(UID_A, ROLE_LISTING_PATH, role_path(BILLING), role_path(REPORTS))

    assert second.id != first.id
    assert_own_role(report, REPORTS)
    _, old_role, new_role = report["responses"]
    assert old_role["status"] == 404, old_role
    assert new_role["status"] == 200, new_role
    issued = broker.audit.wait_for(mark, event="credentials.issued", peer=new_role["local"])
    assert (issued["container_id"], issued["container_name"], issued["app"]) == (second.id, name, REPORTS.name), issued


# --------------------------------------------------------------------------- tokens and addresses


def test_token_is_bound_to_its_container_not_its_app(host, broker):
    first = host.run(labels={LABEL: "billing"})
    twin = host.run(labels={LABEL: "billing"})  # the same app, another container
    token = token_of(first.probe(UID_A))
    mark = broker.audit.mark()

    replay = twin.probe(UID_A, "--token", token, ROLE_LISTING_PATH, role_path(BILLING))

    for response in replay["responses"]:
        assert response["status"] == 401, response
        broker.audit.wait_for(mark, event=DENIALS, reason="bad_token", peer=response["local"], container_id=twin.id)
    assert_own_role(twin.probe(UID_A, ROLE_LISTING_PATH), BILLING)


def test_container_taking_over_a_removed_containers_address_gets_only_its_own_role(host, broker):
    former = host.run(labels={LABEL: "billing"})
    minted = former.probe(UID_A, ROLE_LISTING_PATH)
    assert_own_role(minted, BILLING)
    token = token_of(minted)
    former.remove()

    successor = host.run(labels={LABEL: "reports"}, ip=former.ip)
    mark = broker.audit.mark()
    own = successor.probe(UID_A, ROLE_LISTING_PATH, role_path(BILLING))
    replay = successor.probe(UID_A, "--token", token, ROLE_LISTING_PATH, role_path(BILLING))

    assert successor.ip == former.ip
    assert_own_role(own, REPORTS)
    assert own["responses"][1]["status"] == 404, own["responses"][1]
    for response in replay["responses"]:
        assert response["status"] == 401, response
        broker.audit.wait_for(
            mark, event=DENIALS, reason="bad_token", peer=response["local"], container_id=successor.id
        )
    assert not broker.audit.find(mark, container_id=former.id), broker.audit.dump(mark)


def test_container_forging_another_containers_address_never_gets_its_role(host, broker):
    victim = host.run(labels={LABEL: "billing"})
    assert_own_role(victim.probe(UID_A, ROLE_LISTING_PATH), BILLING)  # H has its neighbour entry
    forger = host.run(name=f"imdsb-forger-{secrets.token_hex(3)}", cap_add=["NET_ADMIN"])
    # The victim's address as a second one, and a fresh ARP for the gateway sent from it:
    # H then takes the forger's MAC for the victim's address, so the handshake completes.
    forger.root(f"ip addr add {victim.ip}/32 dev eth0 && ip neigh flush dev eth0")
    mark = broker.audit.mark()
    try:
        forged = forger.attempt(UID_A, "--bind", victim.ip, ROLE_LISTING_PATH, role_path(BILLING))
    finally:
        forger.root(f"ip addr del {victim.ip}/32 dev eth0")

    assert "error" not in forged, f"the forged connection never reached the broker, so this proves nothing: {forged}"
    assert forged["token"]["local"].startswith(f"{victim.ip}:"), forged
    if forged["token"]["status"] == 200:
        listing, credentials = forged["responses"]
        assert listing["body"] != BILLING.name, listing
        assert credentials["status"] != 200, credentials
        assert listing["status"] == 404 or listing["body"] == FORGER.name, listing
    events = broker.audit.wait_for_some(mark, peer={p for p in peers(forged)})
    for event in events:
        # Judged as the forger (found in its namespace) or refused as unresolved; never the victim.
        assert event.get("container_id") != victim.id, event
        assert event.get("container_id") == forger.id or event.get("reason") == "unresolved", event


# --------------------------------------------------------------------------- runtime API down


def test_runtime_api_down_refuses_label_rules_but_not_cgroup_rules(host, broker):
    host.runtime.stop()
    try:
        # Started while the API is down: the broker cannot have asked about them before.
        labelled = host.run(labels={LABEL: "billing"})
        other = host.run(labels={LABEL: "billing"})
        mark = broker.audit.mark()

        refused = labelled.probe(UID_A, ROLE_LISTING_PATH, role_path(BILLING))
        by_cgroup = other.probe(UID_C, ROLE_LISTING_PATH, role_path(ANY_PODMAN))

        assert_no_credentials(refused)
        assert refused["responses"], f"the token PUT was refused, so the GETs never asked: {refused}"
        for response in refused["responses"]:
            event = broker.audit.wait_for(
                mark, event="credentials.denied", reason="container_runtime", peer=response["local"]
            )
            assert event.get("container_id") == labelled.id, event
            assert str(host.runtime.socket) in json.dumps(event), f"no detail names the socket: {event}"
        assert_own_role(by_cgroup, ANY_PODMAN)
        assert by_cgroup["responses"][1]["status"] == 200, by_cgroup["responses"][1]
        broker.audit.wait_for(
            mark, event="credentials.issued", peer=by_cgroup["responses"][1]["local"], container_id=other.id
        )
    finally:
        if not host.runtime.running:
            host.runtime.start()

    deadline = time.monotonic() + RUNTIME_RECOVERY_S
    while (report := labelled.probe(UID_A, ROLE_LISTING_PATH))["responses"][0]["body"] != BILLING.name:
        assert time.monotonic() < deadline, f"label rules still refused {RUNTIME_RECOVERY_S}s later: {report}"
        time.sleep(0.5)
    assert_own_role(report, BILLING)


# --------------------------------------------------------------------------- hop limit


def test_hop_limit_1_serves_the_bridge_but_not_a_container_one_router_further(host, broker):
    on_bridge = host.run(labels={LABEL: "billing"})
    assert on_bridge.attempt(UID_A)["token"]["status"] == 200

    with routed_client_namespace(host) as routed:
        far = host.run(labels={LABEL: "billing"}, network=f"ns:/run/netns/{routed.client}")
        try:
            before = time_exceeded_sent(routed.router)
            # A handshake on veths takes microseconds; the SYN is resent after 1 s, so a
            # refused handshake is seen to stay refused.
            outcome = far.attempt(UID_A, timeout=HANDSHAKE_TIMEOUT_S)
            after = time_exceeded_sent(routed.router)
        finally:
            far.remove()  # before its namespace goes

    # No answer at all: the SYN got through, the SYN-ACK (TTL 1) expired at the router,
    # which said so to the broker.
    assert outcome.get("error") == "TimeoutError", outcome
    assert after > before, (before, after)


# --------------------------------------------------------------------------- operator tools


def operator_command(host: ContainerHost, broker, *args: str) -> subprocess.CompletedProcess[str]:
    """`imds-broker ARGS --config BROKER_CONFIG`, as root in H (where the operator would run it)."""
    return subprocess.run(
        [*netns_enter(host.netns), str(BROKER_BIN), *args, "--config", str(broker.config)],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S,
    )  # fmt: skip


def test_explain_container_shows_the_identity_and_each_rules_verdict(host, broker, labelled):
    billing = labelled[BILLING.name]
    result = operator_command(host, broker, "explain", "--container", billing.name)

    assert result.returncode == 0, describe(result)
    out = result.stdout
    assert f"container={billing.id} (podman)" in out, out
    assert f"name={billing.name}" in out and f"label {LABEL}=billing" in out, out
    assert f'result: app "billing"' in out, out
    # The cgroup rule pins another uid; the host rule of uid alone never matches a container.
    assert 'rule app[0] "any-podman": no match' in out, out
    assert re.search(r'rule app\[5\] "host-uid": (no match|match \(not reached)', out), out

    stranger = host.run(labels={LABEL: "nobody"})
    result = operator_command(host, broker, "explain", "--container", stranger.id[:12])
    assert result.returncode == 1, describe(result)
    assert "result: no rule matched" in result.stdout, result.stdout


def test_doctor_container_checks_from_the_containers_seat(host, broker, labelled):
    billing = labelled[BILLING.name]
    result = operator_command(host, broker, "doctor", "--container", billing.name, "--expect-role", "billing")

    assert result.returncode == 0, describe(result)
    # Through the bridge gateway, an address of H; then the daemon's answer for this
    # container's own seat (its cgroup): its label's role.
    assert re.search(r"^ok   route: 169\.254\.169\.254 is reached through 10\.123\.0\.1, an address of the host$",
                     result.stdout, re.M), result.stdout  # fmt: skip
    assert re.search(r"^ok   role: .*billing", result.stdout, re.M), result.stdout

    # The same container, expecting another role: the role step says so, exit 1.
    result = operator_command(host, broker, "doctor", "--container", billing.name, "--expect-role", "reports")
    assert result.returncode == 1, describe(result)
    assert re.search(r"^FAIL role: ", result.stdout, re.M), result.stdout

    # A container nobody's rule matches.
    stranger = host.run(labels={LABEL: "nobody"})
    result = operator_command(host, broker, "doctor", "--container", stranger.name)
    assert result.returncode == 1, describe(result)
    assert re.search(r"^FAIL role: no app's rule matches", result.stdout, re.M), result.stdout


def test_doctor_container_finds_a_route_that_does_not_lead_to_the_host(host, broker):
    with routed_client_namespace(host) as routed:
        far = host.run(labels={LABEL: "billing"}, network=f"ns:/run/netns/{routed.client}")
        try:
            result = operator_command(host, broker, "doctor", "--container", far.name)
        finally:
            far.remove()
    assert result.returncode == 1, describe(result)
    assert re.search(r"^FAIL route: from the container, 169\.254\.169\.254 goes to .*not an address of the host",
                     result.stdout, re.M), result.stdout  # fmt: skip
    # Stopped before any connection.
    assert "token" not in result.stdout, result.stdout


# --------------------------------------------------------------------------- audit


def test_every_container_decision_is_audited_with_the_container_and_the_file_verifies(host, broker, labelled):
    container = labelled[BILLING.name]
    mark = broker.audit.mark()
    report = container.probe(UID_A, role_path(BILLING), role_path(REPORTS))
    issued, denied = report["responses"]
    assert (issued["status"], denied["status"]) == (200, 404), report
    for event, peer in (
        ("token.issued", report["token"]["local"]),
        ("credentials.denied", denied["local"]),
    ):
        broker.audit.wait_for(mark, event=event, peer=peer, **container.audit_fields)
    # One line per (caller, app, access key): this container's first serve wrote it.
    broker.audit.wait_for_some(0, event="credentials.issued", app=BILLING.name, **container.audit_fields)

    # Everything the module did: each event naming a container names it as the runtime does,
    # and every served caller from a container is named.
    known = {c.id: c for c in host.containers}
    events = broker.audit.events()
    for event in events:
        if "container_id" in event:
            expected = known[event["container_id"]].audit_fields
            assert event["container_engine"] == "podman", event
            assert event.get("cgroup") == known[event["container_id"]].cgroup, event
            for key in ("container_name", "container_image"):
                if key in event:  # not when the runtime API was down
                    assert event[key] == expected[key], event
        peer = event.get("peer", "")
        if event.get("event") in {"credentials.issued", "token.issued"} and peer.startswith("10.123."):
            assert event.get("container_id") in known, event
    assert {e.get("event") for e in events if "container_id" in e} >= CALLER_EVENTS

    verify = broker.verify_audit()
    assert verify.returncode == 0 and ": OK: " in verify.stdout, describe(verify)
