"""Identity beyond uid, end to end: real processes run as different uids, placed in cgroup
v2 paths the test creates, started from executables at paths it chooses, and callers in
another network namespace, all against the real broker. Each caller gets exactly its own
role, a caller no rule covers gets nothing, and each decision is an audit line naming the
caller. Also `explain` and `check` on the same rules."""

import json
import os
import re
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import (
    BROKER_BIN,
    BROKER_VETH_ADDR,
    CGROUP_PREFIX,
    CLIENT_UIDS,
    CLIENTS,
    CLIENTS_DIR,
    IDENTITY_PROBE_PY,
    REMOTE_ADDRS,
    ROLE_LISTING_PATH,
    Rule,
    broker_config,
    describe,
    python_sha256,
    write_config,
)

UID_A, UID_B, UID_C = CLIENT_UIDS

# Copies of the system python: the same program at different paths; the tagged one also
# has a sha256 of its own.
BILLING_EXE = "opt/billing/bin/python3"
OTHER_EXE = "opt/other/bin/python3"
TOOLS_EXE = "opt/tools/bin/python3"
TAGGED_EXE = "opt/tools/bin/python3-tagged"
TAG = b"\0imds-broker e2e: tagged build\0"
EXECUTABLES = {BILLING_EXE: b"", OTHER_EXE: b"", TOOLS_EXE: b"", TAGGED_EXE: TAG}

# cgroups, relative to the test's own subtree /imdsb-test-<random>.
BILLING = "system.slice/billing.service"
REPORTS = "system.slice/reports.service"
OTHER = "system.slice/other.service"

RULES = (
    Rule("billing", {"uid": UID_A, "systemd_unit": "billing.service", "exe": "/**/opt/billing/bin/*"}),
    Rule("reports", {"uid": UID_B, "cgroup": f"/{CGROUP_PREFIX}*/{REPORTS}"}),
    Rule("tagged", {"exe_sha256": python_sha256(TAG), "gid": UID_C}),
    Rule("edge", {"source": [f"{REMOTE_ADDRS[0]}/32"]}),
    # Matches everything "billing" matches and more: callers of both must get "billing".
    Rule("billing-any-exe", {"uid": UID_A, "systemd_unit": "billing.service"}),
)
RULE = {rule.name: rule for rule in RULES}

UNUSED_STS_ENDPOINT = "http://127.0.0.1:9"  # `check` and `explain` must not call STS


@pytest.fixture(scope="module")
def lab(make_identity_lab):
    return make_identity_lab(RULES, EXECUTABLES)


@dataclass(frozen=True)
class Local:
    """A local caller: who runs what, where, and the app it must end up as (None: none)."""

    uid: int
    exe: str
    cgroup: str
    expect: str | None
    gid: int | None = None


LOCAL_CALLERS = {
    "billing": Local(UID_A, BILLING_EXE, BILLING, "billing"),
    # The unit is the last .service component of the path, even from a sub-cgroup.
    "billing-in-sub-cgroup": Local(UID_A, BILLING_EXE, f"{BILLING}/worker", "billing"),
    # A later rule applies only where no earlier one matches.
    "other-exe-in-billing-unit": Local(UID_A, OTHER_EXE, BILLING, "billing-any-exe"),
    "billing-exe-in-other-unit": Local(UID_A, BILLING_EXE, OTHER, None),
    "billing-exe-in-scope": Local(UID_A, BILLING_EXE, "user.slice/session-7.scope", None),
    "billing-exe-as-other-uid": Local(UID_B, BILLING_EXE, BILLING, None),
    "reports": Local(UID_B, OTHER_EXE, REPORTS, "reports"),
    # A cgroup glob matches the whole path, not a prefix of it.
    "below-reports-cgroup": Local(UID_B, OTHER_EXE, f"{REPORTS}/child", None),
    "reports-cgroup-as-other-uid": Local(UID_A, OTHER_EXE, REPORTS, None),
    "tagged": Local(UID_C, TAGGED_EXE, OTHER, "tagged"),
    # gid is the process's real gid, whatever its uid.
    "tagged-as-other-uid-with-its-gid": Local(UID_B, TAGGED_EXE, OTHER, "tagged", gid=UID_C),
    "tagged-with-other-gid": Local(UID_B, TAGGED_EXE, OTHER, None),
    # Same directory, same program; only the hash differs.
    "untagged-copy": Local(UID_C, TOOLS_EXE, OTHER, None),
    "unmapped": Local(UID_C, OTHER_EXE, "misc", None),
}


def unit_of(cgroup: str) -> str | None:
    units = [part for part in cgroup.split("/") if part.endswith((".service", ".scope"))]
    return units[-1] if units else None


def caller_fields(lab, caller: Local, pid: int) -> dict:
    """The audit fields that must name this caller (None: absent)."""
    cgroup = lab.cgroups.path(caller.cgroup)
    return {
        "uid": caller.uid,
        "pid": pid,
        "exe": os.path.realpath(lab.exe(caller.exe)),
        "cgroup": cgroup,
        "unit": unit_of(cgroup),
    }


@pytest.mark.parametrize("caller", LOCAL_CALLERS.values(), ids=LOCAL_CALLERS.keys())
def test_local_caller_gets_exactly_its_own_role(lab, caller):
    asked = caller.expect or "billing"  # an unmapped caller asks for someone's role anyway
    mark = lab.audit.mark()

    report = lab.probe(
        uid=caller.uid,
        gid=caller.gid,
        exe=lab.exe(caller.exe),
        cgroup=caller.cgroup,
        args=[ROLE_LISTING_PATH, ROLE_LISTING_PATH + asked],
    )

    token, (listing, credentials) = report["token"], report["responses"]
    assert token["status"] == 200, token
    lab.audit.wait_for(mark, event="token.issued", peer=token["local"])
    who = caller_fields(lab, caller, report["pid"])
    if caller.expect:
        assert (listing["status"], listing["body"]) == (200, caller.expect), listing
        assert credentials["status"] == 200, credentials
        lab.audit.wait_for(
            mark,
            event="credentials.issued",
            peer=credentials["local"],
            app=caller.expect,
            role_arn=RULE[caller.expect].app.role_arn,
            access_key_id=json.loads(credentials["body"])["AccessKeyId"],
            **who,
        )
    else:
        for response in (listing, credentials):
            assert response["status"] == 404, response
            lab.audit.wait_for(mark, event="credentials.denied", reason="no_rule", peer=response["local"], **who)


def test_local_caller_is_local_whatever_address_it_dials(lab):
    # The broker's veth address is in the `source` range's subnet, but the socket is local.
    report = lab.probe(
        uid=UID_A, exe=lab.exe(BILLING_EXE), cgroup=BILLING, args=[ROLE_LISTING_PATH], host=BROKER_VETH_ADDR
    )

    (listing,) = report["responses"]
    assert (listing["status"], listing["body"]) == (200, "billing"), listing


def test_remote_caller_covered_by_source_rule_gets_its_role(lab):
    mark = lab.audit.mark()

    report = lab.remote_probe(REMOTE_ADDRS[0], ROLE_LISTING_PATH, ROLE_LISTING_PATH + "edge")

    listing, credentials = report["responses"]
    assert (listing["status"], listing["body"]) == (200, "edge"), listing
    assert credentials["status"] == 200, credentials
    assert credentials["local"].startswith(f"{REMOTE_ADDRS[0]}:"), credentials["local"]
    lab.audit.wait_for(
        mark,
        event="credentials.issued",
        peer=credentials["local"],
        app="edge",
        role_arn=RULE["edge"].app.role_arn,
        access_key_id=json.loads(credentials["body"])["AccessKeyId"],
        uid=None,  # nothing local to name
        pid=None,
    )


# --------------------------------------------------------------------------- SDK


def boto3_whoami(lab, uid: int, exe: str, cgroup: str) -> subprocess.CompletedProcess[str]:
    """clients/boto3_whoami.py run by a python copy (with the venv's packages on its path),
    with only its default credential chain, pointed at the broker."""
    client = lab.spawn(
        uid=uid,
        exe=lab.exe(exe),
        cgroup=cgroup,
        script=CLIENTS_DIR / "boto3_whoami.py",
        env={"PYTHONPATH": sysconfig.get_paths()["purelib"]},
    )
    client.release()
    return client.finish()


def test_boto3_in_mapped_process_gets_its_role(lab):
    result = boto3_whoami(lab, UID_A, BILLING_EXE, BILLING)

    assert result.returncode == 0, describe(result)
    assert re.fullmatch(RULE["billing"].app.assumed_role_arn_re, result.stdout.strip()), describe(result)


def test_boto3_in_unmapped_process_gets_no_credentials(lab):
    result = boto3_whoami(lab, UID_A, BILLING_EXE, OTHER)

    boto3 = next(client for client in CLIENTS if client.name == "boto3")
    assert result.returncode != 0, describe(result)
    assert re.search(boto3.no_credentials_re, result.stderr, re.MULTILINE), describe(result)


# --------------------------------------------------------------------------- explain, check


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BROKER_BIN), *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def explain(lab, *args: str) -> subprocess.CompletedProcess[str]:
    return broker_cli("explain", "--config", str(lab.config), *args)


def verdict(result: subprocess.CompletedProcess[str], index: int) -> str:
    """`match` or `no match` for app[index] in `explain` output."""
    name = RULES[index].name
    found = re.search(rf'^rule app\[{index}\] "{re.escape(name)}": (match|no match)$', result.stdout, re.MULTILINE)
    assert found, f"no verdict for app[{index}] {name!r}\n{describe(result)}"
    return found.group(1)


def rule_block(result: subprocess.CompletedProcess[str], index: int) -> list[str]:
    """The lines explaining app[index], after its verdict line."""
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"rule app[{index}] "))
    rest = lines[start + 1 :]
    end = next((i for i, line in enumerate(rest) if line.startswith(("rule app[", "result:"))), len(rest))
    return rest[:end]


def result_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def matched(name: str) -> str:
    return f'result: app "{name}" -> {RULE[name].app.role_arn}'


NO_MATCH = "result: no rule matched"


def held_process(lab, uid: int, exe: str, cgroup: str):
    """A live process that explain can look at: held.py waiting, never released."""
    client = lab.spawn(uid=uid, exe=lab.exe(exe), cgroup=cgroup, script=IDENTITY_PROBE_PY, args=[lab.endpoint()])
    client.wait_held()
    return client


def test_explain_pid_of_mapped_process(lab):
    client = held_process(lab, UID_A, BILLING_EXE, BILLING)
    try:
        result = explain(lab, "--pid", str(client.pid))
    finally:
        client.stop()

    assert result.returncode == 0, describe(result)
    assert verdict(result, 0) == "match", describe(result)
    assert result_line(result) == matched("billing"), describe(result)


def test_explain_pid_of_unmapped_process_shows_each_criterion(lab):
    client = held_process(lab, UID_A, OTHER_EXE, OTHER)
    try:
        result = explain(lab, "--pid", str(client.pid))
    finally:
        client.stop()

    assert result.returncode == 1, describe(result)
    assert [verdict(result, i) for i in range(len(RULES))] == ["no match"] * len(RULES), describe(result)
    billing_block = "\n".join(rule_block(result, 0))
    for criterion in RULES[0].match:
        assert criterion in billing_block, f"no line for {criterion!r} under app[0]\n{describe(result)}"
    assert result_line(result) == NO_MATCH, describe(result)


def test_explain_pid_of_tagged_executable_hashes_it(lab):
    client = held_process(lab, UID_C, TAGGED_EXE, OTHER)
    try:
        result = explain(lab, "--pid", str(client.pid))
    finally:
        client.stop()

    assert result.returncode == 0, describe(result)
    assert result_line(result) == matched("tagged"), describe(result)


# Callers described on the command line (functions of the lab: paths are per run), and
# the app each must be explained as (None: none).
DESCRIBED = {
    "uid-cgroup-exe": (
        lambda lab: ["--uid", str(UID_A), "--cgroup", lab.cgroups.path(BILLING), "--exe", str(lab.exe(BILLING_EXE))],
        "billing",
    ),
    # The executable is unknown, so the rule that needs it cannot match: never guessed.
    "uid-cgroup-without-exe": (
        lambda lab: ["--uid", str(UID_A), "--cgroup", lab.cgroups.path(BILLING)],
        "billing-any-exe",
    ),
    "uid-cgroup": (lambda lab: ["--uid", str(UID_B), "--cgroup", lab.cgroups.path(REPORTS)], "reports"),
    "unmapped-uid-cgroup": (lambda lab: ["--uid", str(UID_B), "--cgroup", lab.cgroups.path(BILLING)], None),
    "source": (lambda lab: ["--source", REMOTE_ADDRS[0]], "edge"),
    "other-source": (lambda lab: ["--source", REMOTE_ADDRS[1]], None),
}


@pytest.mark.parametrize(("describe_caller", "expect"), DESCRIBED.values(), ids=DESCRIBED.keys())
def test_explain_described_caller(lab, describe_caller, expect):
    result = explain(lab, *describe_caller(lab))

    assert result.returncode == (0 if expect else 1), describe(result)
    assert result_line(result) == (matched(expect) if expect else NO_MATCH), describe(result)


def test_explain_refuses_bad_config_and_usage(lab, tmp_path):
    bad = write_config(tmp_path / "bad.toml", "[server\n")

    assert broker_cli("explain", "--config", str(bad), "--uid", str(UID_A)).returncode == 64
    assert explain(lab).returncode == 64  # nothing to explain


def config_with(tmp_path: Path, rules: list[Rule]) -> Path:
    text = broker_config(
        listen="127.0.0.1:0", sts_endpoint=UNUSED_STS_ENDPOINT, state_dir=tmp_path / "state", rules=rules
    )
    return write_config(tmp_path / "imds-broker.toml", text)


def test_check_accepts_identity_rules_without_shadow_warnings(lab):
    # "billing-any-exe" is broader than "billing", which comes first: nothing is shadowed.
    result = broker_cli("check", "--config", str(lab.config))

    assert result.returncode == 0, describe(result)
    assert "shadowed" not in result.stdout, describe(result)


def test_check_warns_about_shadowed_rule(built, tmp_path):
    rules = [Rule("a", {"uid": UID_A}), Rule("b", {"uid": UID_A, "exe": "/opt/b/bin/*"})]

    result = broker_cli("check", "--config", str(config_with(tmp_path, rules)))

    assert result.returncode == 0, describe(result)
    assert re.search(r'^warning: app\[1\] "b" is shadowed by app\[0\] "a"', result.stdout, re.MULTILINE), describe(
        result
    )


def test_check_rejects_empty_match_table(built, tmp_path):
    result = broker_cli("check", "--config", str(config_with(tmp_path, [Rule("empty", {})])))

    assert result.returncode == 1, describe(result)
    # The tmp_path name contains "match" too: look for the field and the reason.
    assert re.search(r"\bapp\[0\]\.match: needs at least one criterion\b", result.stderr), describe(result)
