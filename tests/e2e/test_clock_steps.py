"""Wall-clock steps while the broker serves (issue 17, fault 3).

moto (STS), the broker and a held boto3 session run under libfaketime sharing one offset file
(see test_rotation.py), which the test steps an hour forward and then an hour back. As a real
NTP step does, only CLOCK_REALTIME moves: the broker runs with FAKETIME_DONT_FAKE_MONOTONIC=1,
so its monotonic and boot clocks stay real.

Checked across each step:
(i)   no credential served (to boto3, or to a raw IMDS probe) has an Expiration in the past by
      the faked clock STS used;
(ii)  an IMDSv2 token is refused once its TTL of real time has passed even when the wall clock
      went back an hour, and (the design: token TTLs are real time) is not cut short when it
      jumped forward;
(iii) AssumeRole calls, from the broker's log: after the forward step each app is refreshed
      unprompted exactly once; after the backward step none;
(iv)  container-token rotation (`rotate_every = 60s`) keeps its real-time interval: no early
      rotation after the forward step, no stall after the backward one.

The only waits for time itself are the short TTL (2 s) and the rotation interval; everything
else waits for a log line (the broker's report of the step, its STS calls, its rotations).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from harness import APP_A, BROKER_BIN, REGION, Server, client_env, serve_broker, start_moto, write_config
from test_rotation import OBTAINED_RE, call, fake_clock, held_client  # noqa: F401 (fixture)

HOUR_S = 3600
ROTATE_EVERY_S = 60
# The refresher re-reads both clocks at least every 10 s (MAX_NAP); slack for a loaded machine.
NOTICE_S = 30
SHORT_TTL_S = 2
PROBE_APP = "probe"  # the test process itself (root), for raw IMDS requests
STEP_RE = re.compile(r"the wall clock was stepped.*step_secs=\"?(?P<step>[+-]\d+)")
ROTATED_RE = re.compile(r"container token written.*cause=\"?scheduled")
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
CREDS_PATH = "/latest/meta-data/iam/security-credentials/"
# Another build of the broker (e.g. the one before a fix, to see this test fail on it).
BROKER = Path(os.environ.get("IMDS_BROKER_BIN", BROKER_BIN))


def config_text(*, sts_endpoint: str, root: Path) -> str:
    return f"""\
[server]
listen = ["127.0.0.1:0"]
imdsv1 = "disabled"
state_dir = "{root / 'state'}"

[sts]
region = "{REGION}"
endpoint_url = "{sts_endpoint}"

[credentials]
# At once: the test counts each app's AssumeRole calls from the prefetch on.
prefetch_spread = "0"

[container]
listen = ["127.0.0.1:0"]
token_dir = "{root / 'tokens'}"
rotate_every = "{ROTATE_EVERY_S}s"
grace = "5s"

[[app]]
name = "{APP_A.name}"
role_arn = "{APP_A.role_arn}"
prefetch = true
container = {{}}
[app.match]
uid = {APP_A.uid}

[[app]]
name = "{PROBE_APP}"
role_arn = "arn:aws:iam::111122223333:role/{PROBE_APP}"
prefetch = true
[app.match]
uid = 0
"""


class Imds:
    """Raw IMDSv2 requests from this (unfaked) process."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _send(self, request: urllib.request.Request) -> tuple[int, str]:
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def token(self, ttl: int) -> str:
        status, body = self._send(
            urllib.request.Request(f"{self.endpoint}/latest/api/token", method="PUT", headers={TTL_HEADER: str(ttl)})
        )
        assert status == 200, (status, body)
        return body

    def creds(self, token: str) -> tuple[int, dict | None]:
        status, body = self._send(
            urllib.request.Request(f"{self.endpoint}{CREDS_PATH}{PROBE_APP}", headers={TOKEN_HEADER: token})
        )
        return status, (json.loads(body) if status == 200 else None)


def expiration(doc: dict) -> float:
    return datetime.fromisoformat(doc["Expiration"].replace("Z", "+00:00")).timestamp()


def wait_for(broker: Server, pattern: re.Pattern[str], count: int, timeout: float) -> list[re.Match[str]]:
    """The first `count` matches of `pattern` in the broker's log, waiting up to `timeout`
    for them; fewer if the time runs out (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(pattern.finditer(broker.stderr_text()))
        if len(found) >= count or time.monotonic() > deadline or broker.proc.poll() is not None:
            return found[:count] if len(found) >= count else found
        time.sleep(0.1)


def obtained_by_role(broker: Server) -> dict[str, int]:
    """AssumeRole successes the broker logged, by role."""
    counts: dict[str, int] = {}
    for m in OBTAINED_RE.finditer(broker.stderr_text()):
        counts[m["role"]] = counts.get(m["role"], 0) + 1
    return counts


@pytest.mark.timeout(600)
def test_wall_clock_steps_while_serving(fake_clock, tmp_path):  # noqa: F811
    if os.geteuid() != 0:
        pytest.fail("runs boto3 as another uid: must run as root")
    if not BROKER.exists():
        pytest.fail(f"not built: {BROKER}")
    env = {**fake_clock.env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    problems: list[str] = []
    # Readable by the app uid (its home, token file): not under pytest's 0700 tmp_path.
    root = Path(tempfile.mkdtemp(prefix="imds-broker-e2e-clock-steps-"))
    root.chmod(0o711)
    home = root / "home"
    home.mkdir(mode=0o700)
    os.chown(home, APP_A.uid, APP_A.uid)
    probe_role = f"arn:aws:iam::111122223333:role/{PROBE_APP}"
    roles = (APP_A.role_arn, probe_role)
    try:
        with start_moto(tmp_path / "moto", extra_env=env) as moto:
            config = write_config(root / "imds-broker.toml", config_text(sts_endpoint=moto.endpoint, root=root))
            rust_log = "info,imds_broker::credentials=debug"
            with serve_broker(root, config, rust_log=rust_log, extra_env=env, binary=BROKER) as broker:
                broker.wait_listening(2)
                started = time.monotonic()
                imds = Imds(broker.endpoint)
                fake_now = lambda: time.time() + fake_clock.offset_s  # noqa: E731
                client_env_a = client_env(home, sts_endpoint=moto.endpoint, imds_endpoint=broker.endpoint)

                def check_served(when: str, client) -> None:
                    """(i): what boto3 and the probe are served now is not expired."""
                    result = call(client)
                    if not result["ok"]:
                        problems.append(f"{when}: boto3 call failed: {result}")
                    elif result["expiry"] <= result["now"]:
                        problems.append(f"{when}: boto3 was served expired credentials: {result}")
                    status, doc = imds.creds(imds.token(60))
                    if status != 200 or doc is None:
                        problems.append(f"{when}: probe got {status}")
                    elif expiration(doc) <= fake_now():
                        problems.append(f"{when}: probe served credentials expired at {doc['Expiration']}")

                # Both apps prefetched; the container token issued.
                assert len(wait_for(broker, OBTAINED_RE, 2, NOTICE_S)) == 2, broker.stderr_tail()
                with held_client(APP_A.uid, client_env_a, env) as client:
                    check_served("before any step", client)
                    before_fwd = obtained_by_role(broker)

                    # ---- an hour forward
                    long_token = imds.token(60)
                    fake_clock.set(HOUR_S)
                    if imds.creds(long_token)[0] != 200:
                        problems.append("forward step: a 60 s token minted just before was refused (cut short)")
                    # Every app's credentials are now expired by the shared clock: each is
                    # refreshed by the broker on its own (no request yet), once.
                    want = {r: before_fwd.get(r, 0) + 1 for r in roles}
                    wait_for(broker, OBTAINED_RE, sum(want.values()), NOTICE_S)
                    if obtained_by_role(broker) != want:
                        problems.append(f"forward step: STS calls by role {obtained_by_role(broker)}, want {want} (refreshed unprompted, once each)")
                    if not wait_for(broker, STEP_RE, 1, NOTICE_S):
                        problems.append("forward step: the broker did not report it")
                    check_served("after the forward step", client)
                    if obtained_by_role(broker) != want:
                        problems.append(f"forward step: STS calls by role {obtained_by_role(broker)} after serving, want {want}")

                    # ---- container rotation, then an hour back
                    first = wait_for(broker, ROTATED_RE, 1, ROTATE_EVERY_S + NOTICE_S)
                    rotated_1 = time.monotonic()
                    if not first:
                        problems.append("no scheduled container-token rotation after the forward step")
                    elif rotated_1 - started < ROTATE_EVERY_S - 2:
                        problems.append(f"forward step: container token rotated {rotated_1 - started:.0f} s after it was issued")
                    short_token = imds.token(SHORT_TTL_S)
                    minted = time.monotonic()
                    settled = obtained_by_role(broker)
                    fake_clock.set(0)
                    if not len(wait_for(broker, STEP_RE, 2, NOTICE_S)) == 2:
                        problems.append("backward step: the broker did not report it")
                    # (ii): the TTL is real time; the only sleep here is for it to pass.
                    time.sleep(max(0.0, minted + SHORT_TTL_S + 0.5 - time.monotonic()))
                    status, _ = imds.creds(short_token)
                    if status != 401:
                        problems.append(f"backward step: a {SHORT_TTL_S} s token was accepted ({status}) {time.monotonic() - minted:.1f} s after it was minted")
                    check_served("after the backward step", client)
                    if obtained_by_role(broker) != settled:
                        problems.append(f"backward step: STS calls by role {obtained_by_role(broker)}, want {settled} (none)")

                    # (iv): the next rotation comes one interval after the last, not an hour later.
                    second = wait_for(broker, ROTATED_RE, 2, ROTATE_EVERY_S + NOTICE_S)
                    rotated_2 = time.monotonic()
                    if len(second) < 2:
                        problems.append(f"backward step: container-token rotation stalled (none {rotated_2 - rotated_1:.0f} s after the last)")
                    elif rotated_2 - rotated_1 < ROTATE_EVERY_S - 2:
                        problems.append(f"container-token rotations {rotated_2 - rotated_1:.0f} s apart, less than {ROTATE_EVERY_S} s")
                    print(f"rotations {rotated_1 - started:.1f} s and {rotated_2 - started:.1f} s after start")
                steps = [m["step"] for m in STEP_RE.finditer(broker.stderr_text())]
                calls = obtained_by_role(broker)
                log = broker.stderr_text()
        print("problems:", json.dumps(problems, indent=1))
        print("steps reported:", steps, "STS calls by role:", calls)
        assert not problems, "\n".join(problems) + "\n--- broker log (tail):\n" + log[-4000:]
    finally:
        shutil.rmtree(root, ignore_errors=True)
