"""True zero-config: in a network namespace of its own, the broker listens where real
IMDS lives (169.254.169.254:80) and the clients are told nothing about it."""

import re
from contextlib import ExitStack

import pytest

from harness import (
    APP_A,
    CLIENTS,
    Callers,
    add_link_local_address,
    describe,
    network_namespace,
    start_broker,
    start_moto,
)

IMDS_ADDRESS = "169.254.169.254"


@pytest.fixture(scope="module")
def zero_config_callers(built, client_homes, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("netns")
    with ExitStack() as stack:
        try:
            netns = stack.enter_context(network_namespace())
        except PermissionError as err:
            pytest.skip(f"this machine does not let the suite create a network namespace: {err}")
        add_link_local_address(netns, IMDS_ADDRESS)
        # Both servers run inside the namespace: moto on the namespace's own 127.0.0.1,
        # the broker on the link-local address. No traffic reaches the host's network.
        moto = stack.enter_context(start_moto(workdir / "moto", netns=netns))
        stack.enter_context(
            start_broker(workdir / "broker", sts_endpoint=moto.endpoint, listen=f"{IMDS_ADDRESS}:80", netns=netns)
        )
        yield Callers(client_homes, sts_endpoint=moto.endpoint, imds_endpoint=None, netns=netns)


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_client_finds_broker_at_default_imds_address(zero_config_callers, client):
    env = zero_config_callers.env(APP_A.uid)
    assert not any(name.startswith("AWS_EC2_METADATA_SERVICE_ENDPOINT") for name in env), env

    result = zero_config_callers.whoami(client, APP_A.uid)

    assert result.returncode == 0, describe(result)
    assert re.fullmatch(APP_A.assumed_role_arn_re, result.stdout.strip()), describe(result)
