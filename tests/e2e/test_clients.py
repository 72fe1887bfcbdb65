"""Real AWS clients, each with only its default credential chain, run as different
uids against the broker: each mapped uid must end up as its own role, the unmapped
uid with no credentials at all."""

import dataclasses
import re

import pytest

from harness import CLIENTS, MAPPED_APPS, ROLE_LISTING_PATH, UNMAPPED_UID, describe

client_params = pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)


@client_params
@pytest.mark.parametrize("app", MAPPED_APPS, ids=lambda a: f"{a.name}-uid{a.uid}")
def test_mapped_uid_gets_its_own_role(callers, client, app):
    result = callers.whoami(client, app.uid)

    assert result.returncode == 0, describe(result)
    assert re.fullmatch(app.assumed_role_arn_re, result.stdout.strip()), describe(result)


@client_params
def test_unmapped_uid_gets_no_credentials(callers, client):
    result = callers.whoami(client, UNMAPPED_UID)

    assert result.returncode != 0, describe(result)
    assert re.search(client.no_credentials_re, result.stderr, re.MULTILINE), describe(result)
    # ...and that is because the broker said "no role for you", not because it was unreachable.
    _, listing = callers.probe(UNMAPPED_UID, ROLE_LISTING_PATH)
    assert listing["status"] == 404, listing


@client_params
def test_an_endpoint_with_a_trailing_slash_works_for_every_sdk(callers, broker, client):
    """`AWS_EC2_METADATA_SERVICE_ENDPOINT=http://host:port/`, the spelling AWS CLI v2 needs:
    the four SDKs here get their role with it too. (They drop the extra slash themselves;
    the `//latest/...` that the JS SDK v2 sends is covered by imds_protocol.rs.)"""
    app = MAPPED_APPS[0]
    with_slash = dataclasses.replace(callers, imds_endpoint=broker.endpoint.rstrip("/") + "/")

    result = with_slash.whoami(client, app.uid)

    assert result.returncode == 0, describe(result)
    assert re.fullmatch(app.assumed_role_arn_re, result.stdout.strip()), describe(result)
