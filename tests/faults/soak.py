#!/usr/bin/env python3
"""Fault campaign: a bounded soak of the real daemon under mixed load (issue 17, fault 7).

For `--minutes` (default 30) the daemon serves, with moto as STS, on a loopback port:

- the four real clients of the e2e suite (boto3, the aws CLI, the JS SDK v3, aws-sdk-rust),
  each in its own loop, each call a new process as one of three app uids (so a new IMDSv2
  token per call), each call's GetCallerIdentity ARN checked against the uid's role;
- two long-lived clients: one boto3 Session held by one process for the whole run (botocore
  refreshes its credentials itself), and a raw IMDSv2 client that PUTs one token at start and
  uses it for every read until the end (each answer checked: the app's role, 200, a key, and
  more than `min_remaining` left);
- a SIGHUP every `--reload-every` seconds (60) that alternately adds/removes an app and
  changes another app's session tag, each reload checked by its effect: the audit file's
  `config.loaded` event (app count, credentials dropped), `/status`, and a probe as the added
  app's uid (served while the app exists, 404 once removed) or a new key for the re-tagged app;
- credentials that must be refreshed every few minutes: a 40 min session with
  `min_remaining = 25m` and `refresh_window = 15m`, the shortest `check` accepts, gives each
  app a refresh at a uniform point of its first 14 minutes.

Every `--sample-every` seconds (10) it records the daemon's RSS, open fds, threads (tasks in
/proc/PID/task; the daemon exports no tokio runtime metrics), the audit file's size and
lines, calls ok/failed per client kind and the daemon's own counters from the admin socket,
to `samples.csv`, and at the end plots each series in `soak.png` (matplotlib, Agg).

Verdict (exit 0 only if all hold; the last stdout line is a JSON summary):
- no failed client call, every client kind made calls, every reload took effect;
- no growth beyond the working set: the median RSS / fds / threads of the last third of the
  samples is within a tolerance of the middle third's (see GROWTH_TOLERANCE);
- the audit file grows linearly with the calls: bytes per line, and lines per client call,
  agree between the middle and the last third (AUDIT_TOLERANCE);
- `audit verify --key K --expect-seq N --expect-hash H` passes after a clean stop (the
  checkpoint taken from /status just before it), and the daemon exits 0 on SIGTERM;
- no secret access key or session token that moto issued appears in the daemon's stdout,
  stderr or audit file;
- every access key the long-lived clients saw was issued by moto for their own role;
- at least one refresh per 10 minutes of run (AssumeRole calls beyond the cold fetches).

Needs root (clients run as other uids), the e2e venv (run it with that venv's python:
moto, boto3, awscli, matplotlib), tests/e2e/js/node_modules, the broker binary and the Rust
client (`examples/sdk_whoami`). Nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import calendar
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (  # noqa: E402
    APP_A,
    APP_B,
    CLIENT_TIMEOUT_S,
    CLIENTS,
    CLIENTS_DIR,
    IMDS_TOKEN_TTL,
    JS_DIR,
    PYTHON,
    REGION,
    REPO_ROOT,
    ROLE_LISTING_PATH,
    App,
    Client,
    HeldProcess,
    as_user,
    client_env,
    describe,
    issued_credentials,
    run_as,
    serve_broker,
    start_moto,
    write_config,
)

DEFAULT_BROKER = REPO_ROOT / "target" / "release" / "imds-broker"
APP_C = App("app-c", 61004)  # re-tagged on every other reload; the raw long-token client's app
APP_E = App("app-e", 61005)  # added and removed on alternate reloads
LOOP_APPS = (APP_A, APP_B, APP_C)  # the uids the per-call clients cycle through
HELD_SESSION_APP = APP_B  # the long-lived boto3 Session
RAW_TOKEN_APP = APP_C  # the raw client that keeps one token for the whole run

# The shortest credential lifetime `check` allows (duration >= min_remaining + 15 min,
# min_remaining >= 25 min, refresh_window <= 15 min): each app is refreshed at a uniform
# point of the 14 minutes after it obtained its credentials (src/credentials/schedule.rs).
SESSION_DURATION = "40m"
MIN_REMAINING_S = 25 * 60
REFRESH_WINDOW = "15m"
# Each STS success is logged at debug level with its key id (never a secret).
BROKER_RUST_LOG = "info,imds_broker::credentials=debug"

# The load starts once /readyz says every prefetch app holds credentials, as a service
# manager would wait for: a cold first request costs a whole AssumeRole, and moto's first one
# takes over a second on a busy machine, past the Rust SDK's and botocore's 1 s IMDS timeout
# (fault 4 of issue 17 measures that cost; the soak is about the steady state).
READY_WAIT_S = 60
RELOAD_WAIT_S = 20  # for the config.loaded event after a SIGHUP (it takes milliseconds)
EFFECT_WAIT_S = 45  # for the re-tagged app's new key: the next client call for it fetches one
POLL_S = 0.2  # how often a file or /status is looked at again while waiting for it
ADMIN_TIMEOUT_S = 10
STOP_JOIN_S = CLIENT_TIMEOUT_S + 10  # a loop finishes the call it is in, bounded by its timeout
CLOCK_SLACK_S = 5  # between the daemon's clock and ours when checking `min_remaining`

# No growth beyond the working set: the last third's median may exceed the middle third's by
# this fraction plus this absolute amount (the first third is warm-up). Medians of ~60 samples
# each (30 min run) do not move with what happens to be in flight at one sampling moment.
# RSS: the daemon's maps are bounded but some still fill during the run (the issuance memory,
# src/audit/repeats.rs, up to 4096 entries of a few hundred bytes: ~0.3 MiB per third at the
# soak's call rate) and glibc's arenas move by ~0.1-0.3 MiB between samples; 3% + 512 KiB
# (~1 MiB for a 17 MiB daemon) catches a leak of ~100 KiB a minute. fds: a median of 12 with
# 1-2 client connections open at some samples; +2 catches one leaked descriptor per few
# hundred calls. Threads: tokio's blocking pool starts threads on demand (identification,
# audit fsync, config loading) and lets them go after 10 s idle: 4-7 seen, median 5; +3.
GROWTH_TOLERANCE = {"rss_kib": (0.03, 512), "fds": (0.0, 2), "threads": (0.0, 3)}
# Bytes per audit line depend on which events dominate (a credentials.issued line is longer
# than an epoch end); lines per call on the client mix in each third: 25% is what a random
# mix of four kinds with 3-16 s per call keeps to over 10 minutes.
AUDIT_TOLERANCE = 0.25


# --------------------------------------------------------------------------- clients

# One boto3 Session for the whole run: for each line on stdin, one GetCallerIdentity; reports
# the ARN and which key botocore signed with (it refreshes from IMDS by itself).
HELD_SESSION_PY = r"""
import json, sys, time
import boto3

session = boto3.Session()
sts = session.client("sts")
for _ in sys.stdin:
    try:
        arn = sts.get_caller_identity()["Arn"]
        frozen = session.get_credentials().get_frozen_credentials()
        out = {"ok": True, "arn": arn, "access_key_id": frozen.access_key}
    except Exception as err:
        out = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print(json.dumps(out), flush=True)
"""

# A raw IMDSv2 client that PUTs one token at start and uses it for every read until stdin
# closes: the token path a long-lived SDK takes (aws-sdk-rust keeps one for up to 6 h). Each
# read is a fresh connection. The secrets go back to the campaign (for the leak check) and
# nowhere else.
RAW_TOKEN_PY = r"""
import http.client, json, sys
from urllib.parse import urlsplit

endpoint, ttl, listing = sys.argv[1:]
url = urlsplit(endpoint)

def call(method, path, headers):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()

status, token = call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
if status != 200:
    sys.exit(f"token PUT answered {status}: {token}")
headers = {"X-aws-ec2-metadata-token": token}
for _ in sys.stdin:
    out = {"token_puts": 1}
    try:
        out["listing_status"], role = call("GET", listing, headers)
        out["role"] = role.strip()
        out["creds_status"], body = call("GET", listing + out["role"], headers)
        if out["creds_status"] == 200:
            out["creds"] = json.loads(body)
        else:
            out["body"] = body[:500]
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    print(json.dumps(out), flush=True)
"""


@dataclass
class Tally:
    """Calls of one client kind: counts, latencies, the first failures in full."""

    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    keys: set[tuple[str, str]] = field(default_factory=set)  # (app, access key id) seen

    def record(self, ok: bool, seconds: float, detail: str = "") -> None:
        self.latencies.append(seconds)
        if ok:
            self.ok += 1
        else:
            self.failed += 1
            if len(self.failures) < 20:
                self.failures.append(detail)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
        return {"ok": self.ok, "failed": self.failed, "p50_s": pick(0.5), "p99_s": pick(0.99), "max_s": pick(1.0)}


class Load:
    """Every client of the run, each on a thread of its own, until `stop` is set."""

    def __init__(
        self, homes: dict[int, Path], sts: str, imds: str, rust_client: Path, js_dir: Path, pause: float, seed: int
    ):
        self.homes, self.sts, self.imds, self.pause, self.seed = homes, sts, imds, pause, seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.clients = [self._client_for(c, rust_client, js_dir) for c in CLIENTS]
        self.tallies = {c.name: Tally() for c in self.clients} | {"boto3-held": Tally(), "imds-raw-token": Tally()}
        self.secrets: set[str] = set()  # what the raw client was handed, for the leak check
        self.threads = [threading.Thread(target=self._loop, args=(c,), name=c.name, daemon=True) for c in self.clients]
        self.threads += [
            threading.Thread(target=self._held_session, name="boto3-held", daemon=True),
            threading.Thread(target=self._raw_token, name="imds-raw-token", daemon=True),
        ]

    @staticmethod
    def _client_for(client: Client, rust_client: Path, js_dir: Path) -> Client:
        if client.name == "rust":
            return Client(client.name, (str(rust_client),), client.no_credentials_re)
        if client.name == "js":
            return Client(client.name, (client.argv[0], str(js_dir / "whoami.mjs")), client.no_credentials_re)
        return client

    def env(self, uid: int) -> dict[str, str]:
        return client_env(self.homes[uid], sts_endpoint=self.sts, imds_endpoint=self.imds)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> list[str]:
        """Stop every loop; the names of any thread still running after STOP_JOIN_S."""
        self.stop.set()
        stuck = []
        for thread in self.threads:
            thread.join(STOP_JOIN_S)
            if thread.is_alive():
                stuck.append(thread.name)
        return stuck

    def totals(self) -> dict[str, tuple[int, int]]:
        with self.lock:
            return {name: (t.ok, t.failed) for name, t in self.tallies.items()}

    def _record(
        self, kind: str, ok: bool, seconds: float, detail: str = "", key: tuple[str, str] | None = None
    ) -> None:
        with self.lock:
            self.tallies[kind].record(ok, seconds, detail)
            if key:
                self.tallies[kind].keys.add(key)

    def _pause(self, rng: random.Random) -> None:
        # Event.wait, not sleep: a stop ends the pause at once.
        self.stop.wait(rng.uniform(0.5, 1.5) * self.pause)

    def _loop(self, client: Client) -> None:
        """One process per call, as one of LOOP_APPS' uids, so a new token per call."""
        rng = random.Random(f"{self.seed}-{client.name}")
        while not self.stop.is_set():
            app = rng.choice(LOOP_APPS)
            began = time.monotonic()
            try:
                result = run_as(app.uid, client.argv, self.env(app.uid))
                ok = result.returncode == 0 and re.fullmatch(app.assumed_role_arn_re, result.stdout.strip()) is not None
                detail = "" if ok else f"{time.strftime('%H:%M:%S')} as {app.name}:\n{describe(result)}"
            except subprocess.TimeoutExpired as err:
                ok, detail = False, f"{time.strftime('%H:%M:%S')} as {app.name}: timed out after {err.timeout}s"
            except OSError as err:
                # The client could not even start (a missing binary): a failed call, counted,
                # never a loop that dies quietly and leaves its kind at zero calls.
                ok, detail = False, f"{time.strftime('%H:%M:%S')} as {app.name}: cannot run: {err}"
            self._record(client.name, ok, time.monotonic() - began, detail)
            self._pause(rng)

    def _held(self, app: App, script: str, args: list[str], kind: str, check: Callable[[dict], str | None]) -> None:
        """Drive a long-lived client: one line per call, one JSON answer per line."""
        rng = random.Random(f"{self.seed}-{kind}")
        argv = [*as_user(app.uid), str(PYTHON), "-c", script, *args]
        client = HeldProcess(argv, self.env(app.uid), self.homes[app.uid])
        try:
            while not self.stop.is_set():
                began = time.monotonic()
                try:
                    client.send("call")
                    answer = json.loads(client.read_line(CLIENT_TIMEOUT_S))
                except (AssertionError, BrokenPipeError, ValueError) as err:
                    # The client is gone or mute: that is a failure, and nothing more to drive.
                    self._record(kind, False, time.monotonic() - began, f"{time.strftime('%H:%M:%S')}: {err}")
                    return
                problem = check(answer)
                key = (app.name, answer.get("access_key_id", "")) if not problem else None
                detail = f"{time.strftime('%H:%M:%S')}: {problem}"
                self._record(kind, problem is None, time.monotonic() - began, detail, key)
                self._pause(rng)
        finally:
            client.stop()

    def _held_session(self) -> None:
        app = HELD_SESSION_APP

        def check(answer: dict) -> str | None:
            if not answer.get("ok"):
                return f"boto3 session failed: {answer.get('error')}"
            if not re.fullmatch(app.assumed_role_arn_re, answer["arn"]):
                return f"boto3 session is {answer['arn']}, not {app.name}"
            return None

        self._held(app, HELD_SESSION_PY, [], "boto3-held", check)

    def _raw_token(self) -> None:
        app = RAW_TOKEN_APP

        def check(answer: dict) -> str | None:
            creds = answer.pop("creds", None)
            if creds:
                answer["access_key_id"] = creds.get("AccessKeyId", "")
                with self.lock:
                    self.secrets.update(filter(None, (creds.get("SecretAccessKey"), creds.get("Token"))))
            if answer.get("error") or answer.get("listing_status") != 200 or answer.get("role") != app.name:
                return f"listing with the held token: {answer}"
            if answer.get("creds_status") != 200 or not creds:
                return f"credentials with the held token: {answer}"
            if creds.get("Code") != "Success" or not creds.get("AccessKeyId", "").startswith("ASIA"):
                return f"credentials document: Code={creds.get('Code')} key={creds.get('AccessKeyId')}"
            left = parse_imds_time(creds["Expiration"]) - time.time()
            if left < MIN_REMAINING_S - CLOCK_SLACK_S:
                return f"served credentials with {left:.0f} s left, under min_remaining ({MIN_REMAINING_S} s)"
            return None

        self._held(app, RAW_TOKEN_PY, [self.imds, IMDS_TOKEN_TTL, ROLE_LISTING_PATH], "imds-raw-token", check)


def parse_imds_time(text: str) -> float:
    """IMDS times are `YYYY-MM-DDTHH:MM:SSZ` in UTC."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


# --------------------------------------------------------------------------- the daemon


def admin_get(sock: Path, path: str) -> tuple[int, str]:
    """GET over the admin Unix socket (HTTP/1.0: the body ends at EOF)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(ADMIN_TIMEOUT_S)
        s.connect(str(sock))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


def metrics(sock: Path) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = admin_get(sock, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def status(sock: Path) -> dict:
    code, body = admin_get(sock, "/status")
    if code != 200:
        raise RuntimeError(f"/status answered {code}: {body}")
    return json.loads(body)


def wait_ready(admin: Path, broker) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        try:
            code, body = admin_get(admin, "/readyz")
        except OSError as err:  # the socket is bound just after `listening on`
            code, body = 0, str(err)
        if code == 200:
            return
        if time.monotonic() > deadline or broker.proc.poll() is not None:
            raise RuntimeError(f"the daemon is not ready after {READY_WAIT_S}s: {code} {body}\n{broker.stderr_tail()}")
        time.sleep(POLL_S)


def app_key(report: dict, app: str) -> str | None:
    return next((row.get("access_key_id") for row in report["apps"] if row["app"] == app), None)


class AuditTail:
    """Follows the audit file: complete lines and bytes so far, and its config.loaded events."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.lines = 0
        self.loaded: list[dict] = []
        self.partial = b""
        self.lock = threading.Lock()

    def poll(self) -> tuple[int, int]:
        """Read what was appended; returns (bytes in whole lines, lines)."""
        with self.lock:
            try:
                with open(self.path, "rb") as file:
                    file.seek(self.offset)
                    data = file.read()
            except FileNotFoundError:
                return 0, 0
            self.offset += len(data)
            *whole, self.partial = (self.partial + data).split(b"\n")
            for line in whole:
                if not line.strip():
                    continue
                self.lines += 1
                if b'"config.loaded"' in line:
                    self.loaded.append(json.loads(line))
            return self.offset - len(self.partial), self.lines


def daemon_config(root: Path, sts: str, reload_no: int) -> tuple[str, set[str]]:
    """The config of the `reload_no`th reload (0: at start) and the app names it serves.
    Odd reloads toggle APP_E (in after 1, 5, 9...; out after 3, 7...); even ones give APP_C
    a new session tag value."""
    with_e = reload_no % 4 in (1, 2)
    tag_generation = reload_no // 2
    apps = [APP_A, APP_B, APP_C] + ([APP_E] if with_e else [])
    text = f"""\
[server]
listen = ["127.0.0.1:0"]
imdsv1 = "disabled"
state_dir = "{root / 'state'}"

[sts]
region = "{REGION}"
endpoint_url = "{sts}"
default_duration = "{SESSION_DURATION}"

[credentials]
min_remaining = "{MIN_REMAINING_S // 60}m"
refresh_window = "{REFRESH_WINDOW}"
"""
    for app in apps:
        text += f"""
[[app]]
name = "{app.name}"
role_arn = "{app.role_arn}"
"""
        if app is APP_C:
            text += f'tags = {{ soak-generation = "{tag_generation}" }}\n'
        if app is not APP_E:
            # Warm before the first caller (see READY_WAIT_S); a re-tagged app is fetched at
            # the reload itself.
            text += "prefetch = true\n"
        text += f"[app.match]\nuid = {app.uid}\n"
    return text, {a.name for a in apps}


class Reloader:
    """SIGHUP every `every` seconds with the next config, each checked by its effect."""

    def __init__(
        self, broker, config: Path, root: Path, sts: str, audit: AuditTail, admin: Path, load: Load, every: float
    ):
        self.broker, self.config, self.root, self.sts = broker, config, root, sts
        self.audit, self.admin, self.load, self.every = audit, admin, load, every
        self.done = 0
        self.failures: list[str] = []
        self.cold_fetches_caused = 0  # AssumeRole inputs this reloader made new (not refreshes)
        self.thread = threading.Thread(target=self._run, name="reloader", daemon=True)

    def _run(self) -> None:
        number = 0
        while not self.load.stop.wait(self.every):
            number += 1
            try:
                problem = self._reload(number)
            except Exception as err:  # a broken check is a failed reload, not a dead thread
                problem = f"{type(err).__name__}: {err}"
            if problem:
                self.failures.append(f"reload {number} ({time.strftime('%H:%M:%S')}): {problem}")
            else:
                self.done += 1

    def _reload(self, number: int) -> str | None:
        text, names = daemon_config(self.root, self.sts, number)
        toggles_e = number % 2 == 1
        e_now_in = APP_E.name in names
        before_c = app_key(status(self.admin), APP_C.name)
        self.audit.poll()
        mark = len(self.audit.loaded)
        write_config(self.config, text)
        self.broker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_WAIT_S
        while len(self.audit.loaded) <= mark:
            if time.monotonic() > deadline:
                return f"no config.loaded event within {RELOAD_WAIT_S}s of SIGHUP"
            time.sleep(POLL_S)  # bounded polling: the file and /status have no change event
            self.audit.poll()
        event = self.audit.loaded[mark]
        if event.get("apps") != len(names):
            return f"config.loaded says {event.get('apps')} apps, the file has {len(names)}: {event}"
        served = {row["app"] for row in status(self.admin)["apps"]}
        if served != names:
            return f"/status serves {sorted(served)}, the file has {sorted(names)}"
        # Dropped: APP_E's credentials when it goes (the probe below fetched them when it came),
        # APP_C's when its tag changes; nothing when an app comes.
        want_dropped = 0 if (toggles_e and e_now_in) else 1
        if event.get("dropped_credentials") != want_dropped:
            return f"config.loaded dropped {event.get('dropped_credentials')} credentials, expected {want_dropped}"
        if toggles_e:
            return self._probe_e(e_now_in)
        # The re-tagged app gets a new AssumeRole (a new key): prefetched at the reload.
        self.cold_fetches_caused += 1
        deadline = time.monotonic() + EFFECT_WAIT_S
        while (after := app_key(status(self.admin), APP_C.name)) in (None, before_c):
            if time.monotonic() > deadline:
                return f"{APP_C.name} still has key {after} {EFFECT_WAIT_S}s after its tag changed"
            time.sleep(POLL_S)  # bounded polling: the file and /status have no change event
        return None

    def _probe_e(self, present: bool) -> str | None:
        argv = [str(PYTHON), str(CLIENTS_DIR / "imds_probe.py"), self.load.imds, IMDS_TOKEN_TTL, ROLE_LISTING_PATH]
        if present:
            argv.append(ROLE_LISTING_PATH + APP_E.name)
            self.cold_fetches_caused += 1
        result = run_as(APP_E.uid, argv, self.load.env(APP_E.uid))
        if result.returncode != 0:
            return f"probe as {APP_E.name}: {describe(result)}"
        _token, listing, *creds = json.loads(result.stdout)
        if not present:
            return None if listing["status"] == 404 else f"removed {APP_E.name} still listed: {listing}"
        if listing["status"] != 200 or listing["body"].strip() != APP_E.name:
            return f"added {APP_E.name} not listed: {listing}"
        if creds[0]["status"] != 200:
            return f"added {APP_E.name} got no credentials: {creds[0]['status']} {creds[0]['body'][:300]}"
        return None


# --------------------------------------------------------------------------- samples

SERIES = [
    # column, panel title
    ("rss_kib", "daemon RSS (KiB)"),
    ("fds", "open fds"),
    ("threads", "threads (/proc/PID/task)"),
    ("audit_bytes", "audit file (bytes)"),
    ("audit_lines", "audit lines"),
    ("open_connections", "open connections (metric)"),
    ("active_tokens", "active IMDS tokens (metric)"),
    ("assume_role_ok", "AssumeRole ok (metric)"),
    ("reloads", "reloads checked"),
]


def proc_sample(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return {
        "rss_kib": rss,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


class Sampler:
    """One row every `every` seconds (on a monotonic schedule), written as it is taken."""

    def __init__(
        self, pid: int, admin: Path, audit: AuditTail, load: Load, reloader: Reloader, csv_path: Path, every: float
    ):
        self.pid, self.admin, self.audit, self.load, self.reloader = pid, admin, audit, load, reloader
        self.every = every
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self.kinds = list(load.tallies)
        self.columns = ["t_s", *(c for c, _ in SERIES), "assume_role_failed", "cache_entries", "tokens_issued"]
        self.columns += [f"{k}_{w}" for k in self.kinds for w in ("ok", "failed")]
        self.file = open(csv_path, "w", newline="")
        self.writer = csv.DictWriter(self.file, self.columns)
        self.writer.writeheader()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        tick = 0
        while True:
            self.take()
            tick += 1
            if self.load.stop.wait(max(0.0, self.start + tick * self.every - time.monotonic())):
                return

    def take(self) -> None:
        try:
            row: dict[str, float] = {"t_s": round(time.monotonic() - self.start, 1)}
            row |= proc_sample(self.pid)
            row["audit_bytes"], row["audit_lines"] = self.audit.poll()
            m = metrics(self.admin)
            row["open_connections"] = metric_sum(m, "imds_broker_open_connections")
            row["active_tokens"] = metric_sum(m, "imds_broker_active_tokens")
            row["tokens_issued"] = metric_sum(m, "imds_broker_tokens_issued_total")
            row["cache_entries"] = metric_sum(m, "imds_broker_cache_entries")
            row["assume_role_ok"] = metric_sum(m, "imds_broker_sts_calls_total", outcome="ok")
            row["assume_role_failed"] = metric_sum(m, "imds_broker_sts_calls_total") - row["assume_role_ok"]
            row["reloads"] = self.reloader.done
            for kind, (ok, failed) in self.load.totals().items():
                row[f"{kind}_ok"], row[f"{kind}_failed"] = ok, failed
        except (OSError, RuntimeError, StopIteration, ValueError) as err:
            self.errors.append(f"sample at {time.monotonic() - self.start:.0f}s: {type(err).__name__}: {err}")
            return
        self.rows.append(row)
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot(rows: list[dict], kinds: list[str], reload_times: list[float], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["t_s"] / 60 for r in rows]
    panels = [*SERIES, ("calls_ok", "client calls ok (cumulative)"), ("calls_failed", "client calls failed")]
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(15, 12), sharex=True)
    for ax, (column, label) in zip(axes.flat, panels):
        if column in ("calls_ok", "calls_failed"):
            which = column.split("_")[1]
            for kind in kinds:
                ax.plot(minutes, [r[f"{kind}_{which}"] for r in rows], label=kind)
            ax.legend(fontsize=7)
        else:
            ax.plot(minutes, [r[column] for r in rows])
        for t in reload_times:
            ax.axvline(t / 60, color="0.85", linewidth=0.6, zorder=0)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- verdict


def thirds(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    n = len(rows)
    return rows[n // 3 : 2 * n // 3], rows[2 * n // 3 :]


def slope(rows: list[dict], column: str) -> float | None:
    """Least-squares growth of `column` per minute (reported; the verdict uses medians)."""
    if len(rows) < 2:
        return None
    xs, ys = [r["t_s"] / 60 for r in rows], [r[column] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 2) if var else None


def growth(rows: list[dict]) -> tuple[dict, list[str]]:
    """First/last and middle/last-third medians of each resource; what grew past tolerance."""
    middle, last = thirds(rows)
    report, problems = {}, []
    for column, (fraction, absolute) in GROWTH_TOLERANCE.items():
        mid = statistics.median(r[column] for r in middle)
        end = statistics.median(r[column] for r in last)
        limit = mid * (1 + fraction) + absolute
        report[column] = {
            "per_minute_over_last_two_thirds": slope(rows[len(rows) // 3 :], column),
            "first": rows[0][column],
            "last": rows[-1][column],
            "max": max(r[column] for r in rows),
            "median_middle_third": mid,
            "median_last_third": end,
            "limit": round(limit, 1),
        }
        if end > limit:
            problems.append(
                f"{column}: last-third median {end} > {limit:.0f} (middle third {mid}, +{fraction:.0%} +{absolute})"
            )
    return report, problems


def audit_linearity(rows: list[dict], kinds: list[str]) -> tuple[dict, list[str]]:
    """Bytes per line and lines per client call, over the middle and the last third."""
    middle, last = thirds(rows)
    report, problems = {}, []

    def calls(row: dict) -> int:
        return sum(row[f"{k}_ok"] + row[f"{k}_failed"] for k in kinds)

    for name, part in (("middle_third", middle), ("last_third", last)):
        lines = part[-1]["audit_lines"] - part[0]["audit_lines"] if len(part) > 1 else 0
        size = part[-1]["audit_bytes"] - part[0]["audit_bytes"] if len(part) > 1 else 0
        n_calls = calls(part[-1]) - calls(part[0]) if len(part) > 1 else 0
        report[name] = {
            "lines": lines,
            "bytes": size,
            "calls": n_calls,
            "bytes_per_line": round(size / lines, 1) if lines else None,
            "lines_per_call": round(lines / n_calls, 3) if n_calls else None,
        }
    report["whole_run_bytes_per_line"] = round(rows[-1]["audit_bytes"] / max(1, rows[-1]["audit_lines"]), 1)
    for measure in ("bytes_per_line", "lines_per_call"):
        mid, end = report["middle_third"][measure], report["last_third"][measure]
        if mid is None or end is None:
            problems.append(f"audit {measure}: too few lines or calls in a third to compare ({mid}, {end})")
        elif abs(end - mid) > AUDIT_TOLERANCE * mid:
            problems.append(
                f"audit {measure}: last third {end} vs middle third {mid} (tolerance {AUDIT_TOLERANCE:.0%})"
            )
    return report, problems


def verify_audit(broker: Path, state: Path, audit: Path, checkpoint: dict | None) -> tuple[str, str | None]:
    keys = sorted(state.glob("audit-verify-*.key"))
    argv = [str(broker), "audit", "verify"]
    if keys:
        argv += ["--key", str(keys[-1])]
    if checkpoint:
        argv += ["--expect-seq", str(checkpoint["seq"]), "--expect-hash", checkpoint["hash"]]
    argv.append(str(audit))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    text = (result.stdout + result.stderr).strip()
    command = " ".join(argv)
    if result.returncode != 0:
        return command, f"audit verify failed ({result.returncode}): {text[-2000:]}"
    if not keys:
        return command, "no verification key in the state dir: the seals were not checked"
    return command, None


def leaked(secrets: set[str], *files: Path) -> list[str]:
    """Which files hold any of `secrets` (never the secrets themselves)."""
    found = []
    for path in files:
        text = path.read_text(errors="replace") if path.exists() else ""
        hits = sum(1 for s in secrets if s and s in text)
        if hits:
            found.append(f"{path}: {hits} secret(s) of the issued credentials")
    return found


# --------------------------------------------------------------------------- the campaign


def client_homes(root: Path, uids: list[int]) -> dict[int, Path]:
    homes = {}
    for uid in uids:
        home = root / "homes" / str(uid)
        home.mkdir(parents=True, mode=0o700)
        os.chown(home, uid, uid)
        homes[uid] = home
    (root / "homes").chmod(0o711)
    return homes


def campaign(args: argparse.Namespace) -> int:
    seed = args.seed
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Not under a 0700 directory: the client uids must reach their homes.
    root = Path(tempfile.mkdtemp(prefix="imds-broker-soak-"))
    root.chmod(0o711)
    problems: list[str] = []
    finished = False
    summary: dict = {"minutes": args.minutes, "seed": seed, "broker": str(args.broker)}
    started = time.monotonic()
    try:
        homes = client_homes(root, [a.uid for a in (*LOOP_APPS, APP_E)])
        with start_moto(root / "moto") as moto:
            text, _ = daemon_config(root, moto.endpoint, 0)
            config = write_config(root / "imds-broker.toml", text)
            check = subprocess.run(
                [str(args.broker), "check", "--config", str(config)], capture_output=True, text=True, timeout=60
            )
            if check.returncode != 0:
                raise RuntimeError(f"`check` refuses the soak config:\n{check.stdout}{check.stderr}")
            broker_dir = root / "broker"
            with serve_broker(broker_dir, config, binary=args.broker, rust_log=BROKER_RUST_LOG) as broker:
                state = root / "state"
                admin, audit_path = state / "admin.sock", state / "audit.log"
                pid = broker.proc.pid
                wait_ready(admin, broker)
                audit = AuditTail(audit_path)
                load = Load(homes, moto.endpoint, broker.endpoint, args.rust_client, args.js_dir, args.pause, seed)
                reloader = Reloader(broker, config, root, moto.endpoint, audit, admin, load, args.reload_every)
                sampler = Sampler(pid, admin, audit, load, reloader, out / "samples.csv", args.sample_every)
                reload_times: list[float] = []
                load.start()
                sampler.thread.start()
                reloader.thread.start()
                deadline = time.monotonic() + args.minutes * 60
                # Wait for the end, or for the daemon to die under the load.
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        broker.proc.wait(min(left, 5))
                        problems.append(f"the daemon exited during the run (code {broker.proc.returncode})")
                        break
                    except subprocess.TimeoutExpired:
                        pass
                stuck = load.finish()
                if stuck:
                    problems.append(f"client loops still running {STOP_JOIN_S}s after the stop: {stuck}")
                reloader.thread.join(RELOAD_WAIT_S + EFFECT_WAIT_S + 10)
                sampler.thread.join(ADMIN_TIMEOUT_S * 3)
                alive = broker.proc.poll() is None
                if alive:
                    sampler.take()  # the final numbers, after every call has ended
                    checkpoint = status(admin).get("audit")
                else:
                    checkpoint = None
                sampler.close()
                pairs = zip(sampler.rows, sampler.rows[1:])
                reload_times = [float(r["t_s"]) for a, r in pairs if r["reloads"] > a["reloads"]]
            exit_code = broker.proc.returncode
            if alive and exit_code != 0:
                problems.append(f"the daemon exited {exit_code} on SIGTERM")
            issued = issued_credentials(moto.endpoint)
        problems += sampler.errors[:5]

        # --- what the clients saw
        tallies = load.tallies
        for kind, tally in tallies.items():
            if tally.failed:
                problems.append(f"{kind}: {tally.failed} failed call(s); first: {tally.failures[0]}")
            if tally.ok == 0:
                problems.append(f"{kind}: no successful call at all")
        with open(out / "failures.log", "w") as log:
            for kind, tally in tallies.items():
                for detail in tally.failures:
                    log.write(f"=== {kind}\n{detail}\n")
            for line in reloader.failures:
                log.write(f"=== reload\n{line}\n")
        problems += reloader.failures[:5]
        expected_reloads = int(args.minutes * 60 // args.reload_every) - 1
        if reloader.done < expected_reloads:
            problems.append(f"only {reloader.done} reloads checked, expected at least {expected_reloads}")

        # --- keys: each one the long-lived clients saw is moto's, for their own role
        role_of = {c["access_key_id"]: c.get("arn", "") for c in issued}
        for kind in ("boto3-held", "imds-raw-token"):
            for app, key in sorted(tallies[kind].keys):
                if key not in role_of:
                    problems.append(f"{kind}: key {key} was not issued by moto")
                elif f":assumed-role/{app}/" not in role_of[key]:
                    problems.append(f"{kind}: key {key} is {role_of[key]}, not {app}'s")

        # --- refreshes: AssumeRole successes beyond the cold fetches (3 apps at start, and
        # each new input a reload made)
        rows = sampler.rows
        assume_ok = rows[-1]["assume_role_ok"] if rows else 0
        cold = len(LOOP_APPS) + reloader.cold_fetches_caused
        refreshes = int(assume_ok - cold)
        if refreshes < int(args.minutes // 10):
            problems.append(f"{refreshes} refreshes in {args.minutes} min: expected at least {int(args.minutes // 10)}")

        # --- growth and the audit file
        if len(rows) >= 6:
            growth_report, growth_problems = growth(rows)
            audit_report, audit_problems = audit_linearity(rows, list(tallies))
            problems += growth_problems + audit_problems
        else:
            growth_report, audit_report = {}, {}
            problems.append(f"only {len(rows)} samples: too few to judge growth")
        verify_command, verify_problem = verify_audit(args.broker, root / "state", audit_path, checkpoint)
        if verify_problem:
            problems.append(verify_problem)

        # --- secrets: none of moto's in what the daemon wrote
        secrets = {c.get(k, "") for c in issued for k in ("secret_access_key", "session_token")} | load.secrets
        problems += leaked(secrets, broker.stderr_path, audit_path)
        if any(s and s in broker.stdout_text() for s in secrets):
            problems.append("the daemon's stdout holds a secret of the issued credentials")

        log = broker.stderr_text()
        summary |= {
            "verdict": "fail" if problems else "pass",
            "duration_s": round(time.monotonic() - started),
            "calls": {kind: t.summary() for kind, t in tallies.items()},
            "calls_ok_total": sum(t.ok for t in tallies.values()),
            "calls_failed_total": sum(t.failed for t in tallies.values()),
            "held_session_keys_seen": len(tallies["boto3-held"].keys),
            "raw_token_keys_seen": len(tallies["imds-raw-token"].keys),
            "reloads_checked": reloader.done,
            "reloads_failed": len(reloader.failures),
            "assume_role_ok": assume_ok,
            "assume_role_failed": rows[-1]["assume_role_failed"] if rows else None,
            "refreshes": refreshes,
            "secrets_checked": len(secrets),
            "samples": len(rows),
            "resources": growth_report,
            "audit": audit_report | {"lines": rows[-1]["audit_lines"] if rows else 0, "verify": verify_command},
            "daemon_log": {
                "bytes": len(log),
                "warn_lines": sum(" WARN " in line for line in log.splitlines()),
                "error_lines": sum(" ERROR " in line for line in log.splitlines()),
                "panics": log.count("panicked"),
            },
            "csv": str(out / "samples.csv"),
            "png": str(out / "soak.png"),
            "problems": problems,
        }
        if summary["daemon_log"]["panics"]:
            problems.append("the daemon's log shows a panic")
            summary["verdict"] = "fail"
        if rows:
            verdict = summary["verdict"].upper()
            title = (
                f"imds-broker soak: {args.minutes} min, seed {seed}, {summary['calls_ok_total']} calls ok, "
                f"{summary['calls_failed_total']} failed: {verdict}"
            )
            plot(rows, list(tallies), reload_times, out / "soak.png", title)
        shutil.copyfile(broker.stderr_path, out / "imds-broker.stderr")
        finished = True
    finally:
        if args.keep or problems or not finished:
            print(f"kept {root} for inspection", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", type=Path, default=DEFAULT_BROKER, help="the daemon binary (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=30, help="length of the run (default 30; CI: 1.5)")
    parser.add_argument("--out", type=Path, default=Path("soak-out"), help="where samples.csv, soak.png... go")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed in the summary)")
    parser.add_argument("--rust-client", type=Path, default=None, help="sdk_whoami (default: in examples/ by --broker)")
    parser.add_argument("--js-dir", type=Path, default=JS_DIR, help="where whoami.mjs and node_modules are")
    parser.add_argument("--pause", type=float, default=2.0, help="mean pause between one loop's calls, s (default 2)")
    parser.add_argument("--reload-every", type=float, default=60, help="seconds between SIGHUPs (default 60)")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between samples (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (daemon state, moto log)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the clients run as other uids")
    if not 0.5 <= args.minutes <= 24 * 60:
        parser.error("--minutes must be between 0.5 and 1440")
    if not (1 <= args.sample_every <= 60 and 10 <= args.reload_every and 0.1 <= args.pause <= 60):
        parser.error("--sample-every 1..60, --reload-every >= 10, --pause 0.1..60")
    # Absolute: the clients run as other uids from their own home directories.
    args.broker = args.broker.resolve()
    if args.rust_client is None:
        args.rust_client = args.broker.parent / "examples" / "sdk_whoami"
    args.rust_client = args.rust_client.resolve()
    args.js_dir = args.js_dir.resolve()
    missing = [p for p in (args.broker, args.rust_client, args.js_dir / "node_modules") if not p.exists()]
    if missing:
        built = "cargo build --release --bins --examples; npm ci in tests/e2e/js"
        parser.error(f"missing: {', '.join(map(str, missing))} ({built})")
    args.out = args.out.resolve()
    args.seed = args.seed if args.seed is not None else random.randrange(2**32)
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
