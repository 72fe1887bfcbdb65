"""Rotation end to end: one boto3 session, held by one process, keeps working for longer than
two credential lifetimes while the broker rotates the role credentials under it; and the
daemon itself prefetches, refreshes with no request in sight, and reloads on SIGHUP.

Time is moved, not waited for: moto (STS), the broker and the client all run under libfaketime
(LD_PRELOAD, from the `libfaketime` wheel in the venv) reading one offset file that the test
steps forward. Wall-clock time jumps for all three at once; monotonic clocks (timeouts, tokio
timers) are left real. No process is changed for the test: the broker binary, moto's server
and botocore's IMDS provider run as they do in production.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import (
    APP_A,
    PYTHON,
    REGION,
    HeldProcess,
    Server,
    as_user,
    client_env,
    issued_credentials,
    serve_broker,
    start_moto,
    write_config,
)

SESSION_S = 3600  # the broker's default AssumeRole duration
STEP_S = 5 * 60  # fake time moves in steps shorter than botocore's 10 min mandatory refresh
SPAN_S = 150 * 60  # > two credential lifetimes
CALL_TIMEOUT_S = 60  # one SDK call through the held session
# The refresher re-reads the wall clock at least every 10 s (MAX_NAP), so a jump of the fake
# clock is noticed within that; twice it, plus slack, bounds each wait for a log line.
BROKER_NOTICE_S = 30
OBTAINED_RE = re.compile(
    r"credentials obtained role=(?P<role>\S+) session=\S+ access_key_id=(?P<key>\S+) refresh_in_secs=(?P<refresh_in>\d+)"
)

# The held client: one boto3 Session for the whole test. For each line on stdin it calls
# GetCallerIdentity and reports which credentials botocore used and when they expire, by its
# own (faked) clock.
HELD_CLIENT = r"""
import json, sys, time
import boto3

session = boto3.Session()
sts = session.client("sts")
for _ in sys.stdin:
    try:
        creds = session.get_credentials()
        frozen = creds.get_frozen_credentials()
        arn = sts.get_caller_identity()["Arn"]
        out = {
            "ok": True,
            "arn": arn,
            "access_key_id": frozen.access_key,
            "method": creds.method,
            "expiry": creds._expiry_time.timestamp(),
            "now": time.time(),
        }
    except Exception as err:
        out = {"ok": False, "error": f"{type(err).__name__}: {err}", "now": time.time()}
    print(json.dumps(out), flush=True)
"""


def libfaketime_so() -> Path:
    libfaketime = pytest.importorskip(
        "libfaketime", reason="the `libfaketime` package (tests/e2e/requirements.txt) is not installed"
    )
    so = Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
    if not so.exists():
        pytest.fail(f"libfaketime wheel without its library: {so}")
    return so


class FakeClock:
    """The offset file every faked process reads on each clock read (FAKETIME_NO_CACHE)."""

    def __init__(self, directory: Path, so: Path):
        self.path = directory / "faketime"
        self.offset_s = 0
        self.set(0)
        self.env = {
            "LD_PRELOAD": str(so),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "DONT_FAKE_MONOTONIC": "1",
        }

    def set(self, offset_s: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"+{offset_s}\n")
        tmp.chmod(0o644)
        os.replace(tmp, self.path)  # atomic: a reader never sees an empty file
        self.offset_s = offset_s


@pytest.fixture
def fake_clock() -> Iterator[FakeClock]:
    so = libfaketime_so()
    # Readable by the client uid: not under pytest's 0700 tmp_path.
    directory = Path(tempfile.mkdtemp(prefix="imds-broker-e2e-clock-"))
    try:
        directory.chmod(0o755)
        yield FakeClock(directory, so)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def broker_config_text(*, sts_endpoint: str, state_dir: Path, role_arn: str = APP_A.role_arn) -> str:
    return f"""\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state_dir}"

[sts]
region = "{REGION}"
endpoint_url = "{sts_endpoint}"

[credentials]
# At once: this test times the prefetch, and its reload's new prefetch, itself.
prefetch_spread = "0"

[[app]]
name = "{APP_A.name}"
role_arn = "{role_arn}"
prefetch = true
[app.match]
uid = {APP_A.uid}
"""


# The broker logs each STS success at debug level (see OBTAINED_RE).
BROKER_RUST_LOG = "info,imds_broker::credentials=debug"


@contextmanager
def held_client(uid: int, env: dict[str, str], preload: dict[str, str]) -> Iterator[HeldProcess]:
    """HELD_CLIENT running as `uid`; `call(client)` makes one SDK call through its session."""
    # The preload goes to the client only, through env(1) after the uid switch: libfaketime
    # keeps a semaphore per process tree, and one created by root (setpriv) is not the
    # client's to open.
    preload_args = ["/usr/bin/env", *(f"{k}={v}" for k, v in preload.items())]
    argv = [*as_user(uid), *preload_args, str(PYTHON), "-c", HELD_CLIENT]
    client = HeldProcess(argv, env, Path(env["HOME"]))
    try:
        yield client
    finally:
        client.stop()


def call(client: HeldProcess) -> dict:
    """One SDK call through the held session; fails if no answer within CALL_TIMEOUT_S
    (the SDK's own IMDS and HTTP timeouts are seconds)."""
    client.send("call")
    return json.loads(client.read_line(CALL_TIMEOUT_S))


def wait_for_obtained(broker: Server, count: int) -> list[re.Match[str]]:
    """Block until the broker has logged `count` STS successes; return them all."""
    deadline = time.monotonic() + BROKER_NOTICE_S
    while True:
        found = list(OBTAINED_RE.finditer(broker.stderr_text()))
        if len(found) >= count:
            return found
        if time.monotonic() > deadline or broker.proc.poll() is not None:
            raise AssertionError(f"{len(found)} of {count} STS calls logged\n{broker.stderr_tail()}")
        time.sleep(0.1)


@pytest.mark.timeout(600)
def test_held_sdk_session_keeps_working_across_rotations(built, client_homes, fake_clock, tmp_path):
    with start_moto(tmp_path / "moto", extra_env=fake_clock.env) as moto:
        workdir = tmp_path / "broker"
        workdir.mkdir()
        config = write_config(
            workdir / "imds-broker.toml",
            broker_config_text(sts_endpoint=moto.endpoint, state_dir=workdir / "state"),
        )
        with serve_broker(workdir, config, rust_log=BROKER_RUST_LOG, extra_env=fake_clock.env) as broker:
            env = client_env(client_homes[APP_A.uid], sts_endpoint=moto.endpoint, imds_endpoint=broker.endpoint)
            results = []
            with held_client(APP_A.uid, env, fake_clock.env) as client:
                for offset in range(0, SPAN_S + 1, STEP_S):
                    fake_clock.set(offset)
                    result = call(client)
                    result["offset"] = offset
                    results.append(result)
                    if not result["ok"]:
                        break
            broker_log = broker.stderr_text()
        issued = {cred["access_key_id"] for cred in issued_credentials(moto.endpoint)}

    context = f"results:\n{json.dumps(results, indent=1)}\n--- broker log (tail):\n{broker_log[-4000:]}"
    failed = [r for r in results if not r["ok"]]
    assert not failed, context
    # The session was held for more than two lifetimes of the credentials it started with.
    assert results[-1]["now"] - results[0]["now"] >= 2 * SESSION_S, context
    for r in results:
        assert re.fullmatch(APP_A.assumed_role_arn_re, r["arn"]), context
        assert r["method"] == "iam-role", context  # botocore's IMDS provider, nothing else
        # Every call was signed with credentials still valid at that (fake) moment.
        assert r["expiry"] > r["now"], context
    # ...and they were rotated under it: several different keys, each one moto issued.
    keys = [r["access_key_id"] for r in results]
    assert len(set(keys)) >= 4, context
    assert set(keys) <= issued, context


@pytest.mark.timeout(300)
def test_broker_prefetches_refreshes_unasked_and_reloads_on_sighup(built, fake_clock, tmp_path):
    with start_moto(tmp_path / "moto", extra_env=fake_clock.env) as moto:
        workdir = tmp_path / "broker"
        workdir.mkdir()
        config = write_config(
            workdir / "imds-broker.toml",
            broker_config_text(sts_endpoint=moto.endpoint, state_dir=workdir / "state"),
        )
        with serve_broker(workdir, config, rust_log=BROKER_RUST_LOG, extra_env=fake_clock.env) as broker:
            # prefetch = true: credentials before anyone asked.
            (first,) = wait_for_obtained(broker, 1)
            assert first["role"] == APP_A.role_arn
            # Past the scheduled refresh point, still with no request at all: refreshed.
            fake_clock.set(int(first["refresh_in"]) + 1)
            second = wait_for_obtained(broker, 2)[1]
            assert second["key"] != first["key"]
            # SIGHUP with a changed role: the old credentials are dropped, the new role fetched.
            new_role = APP_A.role_arn + "-v2"
            write_config(config, broker_config_text(sts_endpoint=moto.endpoint, state_dir=workdir / "state", role_arn=new_role))
            broker.proc.send_signal(signal.SIGHUP)
            third = wait_for_obtained(broker, 3)[2]
            assert third["role"] == new_role
            assert broker.proc.poll() is None, "SIGHUP must not stop the daemon"
            log = broker.stderr_text()
            issued = {cred["access_key_id"] for cred in issued_credentials(moto.endpoint)}
    # The reload is audited with how many cached credential sets it dropped.
    assert re.search(r'event="config\.loaded".*dropped_credentials=1', log), log[-4000:]
    assert {first["key"], second["key"], third["key"]} <= issued
