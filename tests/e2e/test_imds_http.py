"""The IMDS wire details that SDKs depend on but do not report, checked with raw
HTTP as the calling uid (see shared/imds-protocol.md for the rule IDs)."""

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from harness import APP_A, IMDS_TOKEN_TTL, MAPPED_APPS, ROLE_LISTING_PATH, UNMAPPED_UID, header

EXPIRATION_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
# botocore rewrites the expiry of credentials with less left than this (I-3.4.1).
MIN_REMAINING_VALIDITY = timedelta(minutes=25)


def test_token_put_returns_bare_token_and_echoes_ttl(callers):
    (token,) = callers.probe(APP_A.uid)

    assert token["status"] == 200, token
    assert header(token, "X-aws-ec2-metadata-token-ttl-seconds") == IMDS_TOKEN_TTL  # I-1.2.8
    # I-1.2.7: the body is the token exactly; Rust rejects whitespace or non-visible ASCII.
    assert re.fullmatch(r"[\x21-\x7e]+", token["body"]), repr(token["body"])


@pytest.mark.parametrize("app", MAPPED_APPS, ids=lambda a: a.name)
def test_role_listing_is_exactly_the_role_name(callers, app):
    _, listing = callers.probe(app.uid, ROLE_LISTING_PATH)

    assert listing["status"] == 200, listing
    assert listing["body"] == app.name  # I-2.1.1: no trailing newline


def test_role_listing_is_404_for_unmapped_uid(callers):
    _, listing = callers.probe(UNMAPPED_UID, ROLE_LISTING_PATH)

    assert listing["status"] == 404, listing


def test_credential_document(callers):
    _, response = callers.probe(APP_A.uid, ROLE_LISTING_PATH + APP_A.name)

    assert response["status"] == 200, response
    assert (header(response, "Content-Type") or "").startswith("text/plain"), response["headers"]  # I-1.4.1
    assert header(response, "Server") == "EC2ws", response["headers"]
    document = json.loads(response["body"])
    assert document["Code"] == "Success"
    for field in ("AccessKeyId", "SecretAccessKey", "Token", "Expiration"):
        assert isinstance(document.get(field), str) and document[field], (field, document.get(field))
    assert re.fullmatch(EXPIRATION_RE, document["Expiration"]), document["Expiration"]  # I-2.1.5
    expiration = datetime.strptime(document["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert expiration - datetime.now(UTC) > MIN_REMAINING_VALIDITY, document["Expiration"]


def test_instance_metadata_paths(callers):
    _, region, zone, instance_id, identity = callers.probe(
        APP_A.uid,
        "/latest/meta-data/placement/region",
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/instance-id",
        "/latest/dynamic/instance-identity/document",
    )

    for response in (region, zone, instance_id, identity):
        assert response["status"] == 200, response
        assert (header(response, "Content-Type") or "").startswith("text/plain"), response
    # botocore derives the region from the zone by dropping its last character.
    assert zone["body"][:-1] == region["body"], (zone["body"], region["body"])
    assert instance_id["body"].startswith("i-"), instance_id
    assert json.loads(identity["body"])["region"] == region["body"]
