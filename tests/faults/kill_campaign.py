#!/usr/bin/env python3
"""Fault campaign: `kill -9` the daemon at random moments, restart it, check what it left.

Scenarios (`--scenario`, `all` runs each in turn with `--iterations` kills):

- rotation:  two loops call `imds-broker token rotate` while the daemon is killed 0-400 ms
             after it listens; the token in the app's file must open the endpoint after restart.
- load:      IMDSv2 clients as two mapped uids and an unmapped one hammer the daemon (every
             request is an audit event, so audit batches are being written at the kill); the
             tokens each uid held before the kill must still give it its role and credentials.
- token-key: a fresh state directory each time, killed 0-120 % of a start-up's duration after
             the spawn (while the audit sealing keys, the token key, the container token state
             and the token files are created); the next start must come up with exactly the
             files a clean start makes, with their modes, and keep every key that was whole at
             the kill (a replaced key would kill the tokens issued with it).
- reload:    SIGHUP with the other of two configs (an app with a container token added or
             removed, prefetch toggled), killed 0-50 or 0-300 ms later; the next start must serve the
             config on disk.

After every kill the audit file must verify, except for a torn last line; after the next start
that line must be recorded by an `audit.truncated` event with the same offset and digest (checked
on the final file, which must verify with the sealing key too). After every start no `*.tmp`
file is left in the state or token directory.

Needs root (clients run as other uids, token files are chowned), target/debug/imds-broker, the
e2e venv (moto). Prints one JSON summary line; exits 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (  # noqa: E402
    APP_A,
    APP_B,
    BROKER_BIN,
    PYTHON,
    REGION,
    UNMAPPED_UID,
    Server,
    as_user,
    hermetic_env,
    serve_broker,
    start_moto,
    write_config,
)

SCENARIOS = ("rotation", "load", "token-key", "reload")
CLIENT = Path(__file__).resolve().parent / "imds_client.py"
CLI_TIMEOUT_S = 15  # one `token rotate`, `audit verify` or client check
LOAD_WAIT_S = 15  # for every load client to be served after a start
ROTATION_KILL_S = (0.0, 0.4)  # after listening
LOAD_KILL_S = (0.0, 0.5)  # after every client was served
AUDIT_GROWING_S = 0.01  # a kill counts as during audit writes if the file grew in this span
RELOAD_KILL_S = ((0.0, 0.05), (0.0, 0.3))  # after the SIGHUP: half while it is applied, half later
STARTUP_SPAN = 1.2  # token-key: kill within this share of a clean start-up's duration
ROTATORS = 2
LOAD_WORKERS = ((APP_A.uid, 2), (APP_B.uid, 2), (UNMAPPED_UID, 1))
# What a start logs when it finds the traces of a kill: shows which windows the kills hit.
RECOVERIES = {
    "temp_files_removed": "removed temporary files",
    "rotation_dropped": "cut short before its file was written",
    "rotation_finished": "recovered",
    "unknown_token_replaced": "holds a token the state does not know",
    "audit_truncated": "cut off and recorded as audit.truncated",
    "seal_state_caught_up": "sealing state was behind the audit file",
    "empty_key_replaced": "was empty",
    "seal_schedule_resumed": "resumed the key schedule",
}
VERIFY_KEY_RE = re.compile(r"^audit-verify-[0-9a-f]+\.key$")


# --------------------------------------------------------------------------- shared checks


@dataclass
class Run:
    """One scenario's results."""

    name: str
    kills: int = 0
    failures: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    recoveries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RECOVERIES, 0))

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"FAIL [{self.name}] {message}", file=sys.stderr, flush=True)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def saw_start(self, server: Server) -> None:
        log = server.stderr_text()
        for kind, needle in RECOVERIES.items():
            self.recoveries[kind] += needle in log


@dataclass
class Ctx:
    broker: Path
    rng: random.Random
    root: Path
    sts: str
    deadline: float
    keep: bool
    widen_us: int = 0

    def out_of_time(self, run: Run, i: int) -> bool:
        if time.monotonic() > self.deadline:
            run.fail(f"stopped after {i} starts: --max-seconds passed")
            return True
        return bool(run.failures) and not self.keep


def temp_files(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.is_dir() for p in d.iterdir() if p.name.endswith(".tmp"))


def verify(broker: Path, audit: Path, key: Path | None = None) -> str | None:
    """None if `audit verify` passes, else what it said."""
    argv = [str(broker), "audit", "verify", *(["--key", str(key)] if key else []), str(audit)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    return None if result.returncode == 0 else (result.stdout + result.stderr).strip()


class AuditTrail:
    """Checks one audit file across kills: after each kill the file verifies up to a torn last
    line; at the end every torn line seen is in an `audit.truncated` event and the whole file
    verifies (with the sealing key when there is one)."""

    def __init__(self, ctx: Ctx, run: Run, audit: Path) -> None:
        self.ctx, self.run, self.audit = ctx, run, audit
        self.torn: dict[tuple[int, str], str] = {}  # (offset, sha256) -> after which kill

    def after_kill(self, where: str) -> None:
        if not self.audit.exists():
            return
        data = self.audit.read_bytes()
        cut = data.rfind(b"\n") + 1
        checked = self.audit
        if cut < len(data):
            key = (cut, hashlib.sha256(data[cut:]).hexdigest())
            if key not in self.torn:
                self.torn[key] = where
                self.run.count("audit_torn_at_kill")
            checked = self.ctx.root / "audit-prefix.log"
            checked.write_bytes(data[:cut])
        if (problem := verify(self.ctx.broker, checked)) is not None:
            self.run.fail(f"{where}: audit verify (up to any torn last line): {problem}")

    def final(self, where: str, key: Path | None) -> None:
        if (problem := verify(self.ctx.broker, self.audit, key)) is not None:
            self.run.fail(f"{where}: audit verify{' --key' if key else ''}: {problem}")
        recorded = set()
        for line in self.audit.read_text(errors="replace").splitlines():
            event = json.loads(line)
            if event.get("event") == "audit.truncated":
                recorded.add((event["offset"], event["sha256"]))
        for (offset, digest), kill in self.torn.items():
            if (offset, digest) not in recorded:
                self.run.fail(f"{where}: the torn line at offset {offset} ({kill}) has no audit.truncated event")
        self.run.count("audit_truncated_events", len(recorded))


def only_verify_key(state_dir: Path) -> Path | None:
    keys = [p for p in state_dir.iterdir() if VERIFY_KEY_RE.match(p.name)]
    return keys[0] if len(keys) == 1 else None


def container_status(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": token})
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def client_as(uid: int, *args: str) -> object:
    """imds_client.py as `uid`; its JSON output."""
    result = subprocess.run(
        [*as_user(uid), str(PYTHON), str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        cwd="/",
        env=hermetic_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"imds_client.py {args[0]} as {uid}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def broker_env() -> dict[str, str]:
    """What serve_broker gives the daemon (for starts that are killed before they listen)."""
    return hermetic_env(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        RUST_LOG="info",
    )


def config_text(root: Path, sts: str, apps: str, container: bool) -> str:
    text = f"""\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{root / 'state'}"

[sts]
region = "{REGION}"
endpoint_url = "{sts}"

# The load clients ask far more often than an SDK: the per-caller rate is not under test.
[limits]
requests_per_second = 100000
burst = 100000
"""
    if container:
        text += f"""
[container]
listen = ["127.0.0.1:0"]
token_dir = "{root / 'tokens'}"
"""
    return text + apps


def app(name: str, role: str, uid: int, *, container: bool = False, prefetch: bool = False) -> str:
    return f"""
[[app]]
name = "{name}"
role_arn = "{role}"
match = {{ uid = {uid} }}
prefetch = {str(prefetch).lower()}
{"container = {}" if container else ""}
"""


def scenario_dir(ctx: Ctx, name: str) -> Path:
    root = ctx.root / name
    root.mkdir()
    root.chmod(0o711)  # the apps' uids must reach their token files
    return root


# --------------------------------------------------------------------------- rotation


class Rotator:
    """Calls `token rotate` in `ROTATORS` loops until stopped; counts the successes."""

    def __init__(self, broker: Path, config: Path, app_name: str) -> None:
        self.argv = [str(broker), "token", "rotate", app_name, "--config", str(config)]
        self.stop = threading.Event()
        self.ok = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(ROTATORS)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                result = subprocess.run(self.argv, capture_output=True, timeout=CLI_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0:
                with self.lock:
                    self.ok += 1

    def finish(self) -> int:
        self.stop.set()
        for thread in self.threads:
            thread.join(CLI_TIMEOUT_S + 5)
        return self.ok


def rotation(ctx: Ctx, iterations: int) -> Run:
    run = Run("rotation")
    root = scenario_dir(ctx, "rotation")
    token_dir, state_dir = root / "tokens", root / "state"
    token_file = token_dir / f"{APP_A.name}.token"
    config = write_config(
        root / "imds-broker.toml",
        config_text(root, ctx.sts, app(APP_A.name, APP_A.role_arn, APP_A.uid, container=True), True),
    )
    trail = AuditTrail(ctx, run, state_dir / "audit.log")
    for i in range(iterations + 1):  # the last start only checks, then stops cleanly
        if ctx.out_of_time(run, i):
            break
        with serve_broker(root / "logs" / f"{i:04d}", config, binary=ctx.broker) as server:
            _imds, container = server.wait_listening(2)
            where = f"start {i} ({server.stderr_path})"
            if left := temp_files(token_dir, state_dir):
                run.fail(f"{where}: temporary files left: {left}")
            status = container_status(f"http://{container}/v1/credentials", token_file.read_text())
            if status != 200:
                run.fail(f"{where}: the token in the file got {status}")
            run.saw_start(server)
            if i == iterations:
                break
            rotator = Rotator(ctx.broker, config, APP_A.name)
            time.sleep(ctx.rng.uniform(*ROTATION_KILL_S))
            server.proc.kill()
            server.proc.wait(CLI_TIMEOUT_S)
            run.kills += 1
            run.count("rotations_acknowledged", rotator.finish())
        trail.after_kill(f"kill {i}")
    trail.final("after the clean stop", only_verify_key(state_dir))
    return run


# --------------------------------------------------------------------------- load


class Worker:
    """imds_client.py hammer as one uid, for the whole scenario; remembers the tokens it got."""

    def __init__(self, uid: int, endpoint_file: Path, log: Path) -> None:
        self.uid = uid
        self.lock = threading.Lock()
        self.ok = 0
        self.tokens: list[str] = []
        self.stderr = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*as_user(uid), str(PYTHON), str(CLIENT), "hammer", str(endpoint_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd="/",
            env=hermetic_env(),
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, _, value = line.strip().partition(" ")
            with self.lock:
                if kind == "token":
                    self.tokens.append(value)
                    del self.tokens[:-2]  # the newest two are enough
                elif kind == "ok":
                    self.ok += 1

    def served(self) -> int:
        with self.lock:
            return self.ok

    def latest_tokens(self) -> list[str]:
        with self.lock:
            return list(self.tokens)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(CLI_TIMEOUT_S)
        self.reader.join(CLI_TIMEOUT_S)
        self.stderr.close()


def wait_served(workers: list[Worker], before: dict[int, int], timeout: float) -> list[Worker]:
    """The workers not served again (beyond `before`) within `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        late = [w for w in workers if w.served() <= before[id(w)]]
        if not late:
            return []
        time.sleep(0.01)
    return [w for w in workers if w.served() <= before[id(w)]]


def check_tokens(run: Run, where: str, endpoint: str, held: dict[int, list[str]], names: dict[int, str]) -> None:
    for uid, tokens in held.items():
        if not tokens:
            continue
        results = client_as(uid, "check", endpoint, *tokens)
        run.count("pre_kill_tokens_checked", len(tokens))
        for token_no, result in enumerate(results):
            if result != {"listing": 200, "role": names[uid], "credentials": 200}:
                run.fail(f"{where}: uid {uid}'s token #{token_no} from before the kill got {result}")


def load(ctx: Ctx, iterations: int) -> Run:
    run = Run("load")
    root = scenario_dir(ctx, "load")
    state_dir = root / "state"
    apps = app(APP_A.name, APP_A.role_arn, APP_A.uid) + app(APP_B.name, APP_B.role_arn, APP_B.uid, prefetch=True)
    config = write_config(root / "imds-broker.toml", config_text(root, ctx.sts, apps, False))
    endpoint_file = root / "endpoint"
    endpoint_file.write_text("127.0.0.1:9\n")
    endpoint_file.chmod(0o644)
    names = {APP_A.uid: APP_A.name, APP_B.uid: APP_B.name}
    trail = AuditTrail(ctx, run, state_dir / "audit.log")
    with ExitStack() as stack:
        workers = []
        for uid, count in LOAD_WORKERS:
            for n in range(count):
                worker = Worker(uid, endpoint_file, root / f"client-{uid}-{n}.stderr")
                stack.callback(worker.stop)
                workers.append(worker)
        mapped = [w for w in workers if w.uid in names]
        held: dict[int, list[str]] = {}
        for i in range(iterations + 1):
            if ctx.out_of_time(run, i):
                break
            with serve_broker(root / "logs" / f"{i:04d}", config, binary=ctx.broker) as server:
                endpoint = server.addresses[0]
                where = f"start {i} ({server.stderr_path})"
                tmp = endpoint_file.with_suffix(".new")
                tmp.write_text(endpoint + "\n")
                tmp.chmod(0o644)
                tmp.replace(endpoint_file)
                if left := temp_files(state_dir):
                    run.fail(f"{where}: temporary files left: {left}")
                check_tokens(run, where, endpoint, held, names)
                run.saw_start(server)
                if i == iterations:
                    break
                before = {id(w): w.served() for w in mapped}
                if late := wait_served(mapped, before, LOAD_WAIT_S):
                    run.fail(f"{where}: uids {[w.uid for w in late]} not served within {LOAD_WAIT_S}s")
                time.sleep(max(0.0, ctx.rng.uniform(*LOAD_KILL_S) - AUDIT_GROWING_S))
                size_before = trail.audit.stat().st_size
                time.sleep(AUDIT_GROWING_S)
                # Read before the kill: every token here was issued before it.
                held = {uid: [t for w in mapped if w.uid == uid for t in w.latest_tokens()] for uid in names}
                growing = trail.audit.stat().st_size > size_before
                server.proc.kill()
                server.proc.wait(CLI_TIMEOUT_S)
                run.kills += 1
            # How many kills came while audit batches were being written.
            run.count("kills_with_audit_growing", growing)
            trail.after_kill(f"kill {i}")
        run.count("requests_served", sum(w.served() for w in mapped))
    trail.final("after the clean stop", only_verify_key(state_dir))
    return run


# --------------------------------------------------------------------------- token-key


def key_id(state: Path) -> str | None:
    match = re.search(r'^key_id = "([0-9a-f]+)"$', state.read_text(errors="replace"), re.M) if state.exists() else None
    return match.group(1) if match else None


def snapshot(state_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file in the state dir: (mode, content)."""
    if not state_dir.is_dir():
        return {}
    return {p.name: (p.stat().st_mode & 0o7777, p.read_bytes()) for p in state_dir.iterdir() if p.is_file()}


def shape(files: dict[str, tuple[int, bytes]]) -> list[tuple[str, str]]:
    """Names (a verification key's as a pattern, so two show as two) and modes."""
    return sorted(
        ("audit-verify-ID.key" if VERIFY_KEY_RE.match(n) else n, oct(mode)) for n, (mode, _) in files.items()
    )


def signal_daemon(server: Server, signum: int, launcher: list[str]) -> bool:
    """Sends `signum` to the daemon: under strace, to strace's child (strace stopped or killed
    lets its tracee run on). Whether there was a daemon to signal."""
    if not launcher:
        server.proc.send_signal(signum)
        return True
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    for child in children:
        os.kill(int(child), signum)
    return bool(children)


def token_key(ctx: Ctx, iterations: int) -> Run:
    run = Run("token-key")
    base = scenario_dir(ctx, "token-key")
    apps = app(APP_A.name, APP_A.role_arn, APP_A.uid, container=True) + app(APP_B.name, APP_B.role_arn, APP_B.uid)

    def fresh(name: str) -> tuple[Path, Path]:
        root = base / name
        root.mkdir()
        root.chmod(0o711)
        return root, write_config(root / "imds-broker.toml", config_text(root, ctx.sts, apps, True))

    # With --widen-us the killed start runs under strace, every write(2) held back that long
    # before it runs: a file just created stays empty that long, so kills land in the windows
    # between creating a file and writing it (a few microseconds otherwise).
    launcher = (
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=write", "-e", f"inject=write:delay_enter={ctx.widen_us}"]
        if ctx.widen_us
        else []
    )
    # What a clean first start makes, and how long it takes to listen (as the killed start runs).
    spans = []
    reference: list[tuple[str, str]] = []
    for n in range(3):
        root, config = fresh(f"clean-{n}")
        began = time.monotonic()
        with serve_broker(root / "logs", config, binary=ctx.broker, launcher=launcher) as server:
            server.wait_listening(2)
            spans.append(time.monotonic() - began)
            reference = shape(snapshot(root / "state"))
            signal_daemon(server, signal.SIGTERM, launcher)
    span = sorted(spans)[1] * STARTUP_SPAN
    run.count("startup_ms_median", int(sorted(spans)[1] * 1000))
    for i in range(iterations):
        if ctx.out_of_time(run, i):
            break
        root, config = fresh(f"{i:04d}")
        state_dir, token_dir = root / "state", root / "tokens"
        token_file = token_dir / f"{APP_A.name}.token"
        logs = root / "logs"
        logs.mkdir()
        argv = [*launcher, str(ctx.broker), "serve", "--config", str(config)]
        server = Server("imds-broker", argv, broker_env(), logs)
        time.sleep(ctx.rng.uniform(0, span))
        if launcher:
            run.count("kills_before_exec", not signal_daemon(server, signal.SIGKILL, launcher))
            server.proc.wait(CLI_TIMEOUT_S)
        server.proc.kill()
        server.proc.wait(CLI_TIMEOUT_S)
        server.stop()
        run.kills += 1
        at_kill = snapshot(state_dir)
        token_at_kill = token_file.read_text() if token_file.exists() else None
        whole_key = at_kill.get("token.key", (0, b""))[1]
        whole_key = whole_key if len(whole_key) == 32 else None
        verify_keys = [n for n in at_kill if VERIFY_KEY_RE.match(n) and at_kill[n][1].endswith(b'"\n')]
        run.count("kills_with_token_key_whole", whole_key is not None)
        run.count("kills_with_token_key_partial", "token.key" in at_kill and whole_key is None)
        run.count("kills_before_any_file", not at_kill)
        trail = AuditTrail(ctx, run, state_dir / "audit.log")
        trail.after_kill(f"kill {i}")
        try:
            with serve_broker(logs / "restart", config, binary=ctx.broker) as server:
                _imds, container = server.wait_listening(2)
                where = f"restart {i} ({server.stderr_path})"
                run.saw_start(server)
                after = snapshot(state_dir)
                if shape(after) != reference:
                    run.fail(f"{where}: state dir {shape(after)}, a clean start makes {reference}")
                if left := temp_files(token_dir, state_dir):
                    run.fail(f"{where}: temporary files left: {left}")
                if whole_key is not None and after.get("token.key", (0, b""))[1] != whole_key:
                    run.fail(f"{where}: the token key whole at the kill was replaced: its tokens died")
                now_verify = [n for n in after if VERIFY_KEY_RE.match(n)]
                if verify_keys and now_verify != verify_keys:
                    run.fail(f"{where}: verification key {verify_keys} whole at the kill, now {now_verify}")
                state_id = key_id(state_dir / "audit-seal.state")
                if now_verify != [f"audit-verify-{state_id}.key"]:
                    run.fail(f"{where}: sealing state key_id {state_id} but verification keys {now_verify}")
                status = container_status(f"http://{container}/v1/credentials", token_file.read_text())
                if status != 200:
                    run.fail(f"{where}: the token in the file got {status}")
                if token_at_kill and token_file.read_text() != token_at_kill:
                    run.count("token_file_replaced_after_kill")
        except RuntimeError as err:  # it did not start
            run.fail(f"restart {i}: {err}")
            if not ctx.keep:
                break
            continue
        trail.final(f"restart {i}", only_verify_key(state_dir))
        if not run.failures:
            shutil.rmtree(root, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- reload


def reload(ctx: Ctx, iterations: int) -> Run:
    run = Run("reload")
    root = scenario_dir(ctx, "reload")
    state_dir, token_dir = root / "state", root / "tokens"
    a_token = token_dir / f"{APP_A.name}.token"
    b_token = token_dir / f"{APP_B.name}.token"
    configs = [
        # B is there (IMDS and a container token), A prefetches.
        config_text(
            root,
            ctx.sts,
            app(APP_A.name, APP_A.role_arn, APP_A.uid, container=True, prefetch=True)
            + app(APP_B.name, APP_B.role_arn, APP_B.uid, container=True),
            True,
        ),
        # B is gone, A does not prefetch.
        config_text(root, ctx.sts, app(APP_A.name, APP_A.role_arn, APP_A.uid, container=True), True),
    ]
    path = write_config(root / "imds-broker.toml", configs[0])
    on_disk = 0
    trail = AuditTrail(ctx, run, state_dir / "audit.log")
    endpoint_file = root / "endpoint"
    endpoint_file.write_text("127.0.0.1:9\n")
    endpoint_file.chmod(0o644)
    with ExitStack() as stack:
        worker = Worker(APP_A.uid, endpoint_file, root / "client.stderr")
        stack.callback(worker.stop)
        for i in range(iterations + 1):
            if ctx.out_of_time(run, i):
                break
            with serve_broker(root / "logs" / f"{i:04d}", path, binary=ctx.broker) as server:
                imds, container = server.wait_listening(2)
                endpoint_file.write_text(imds + "\n")
                where = f"start {i} ({server.stderr_path}), config {on_disk}"
                run.saw_start(server)
                if left := temp_files(token_dir, state_dir):
                    run.fail(f"{where}: temporary files left: {left}")
                b_probe = client_as(APP_B.uid, "probe", imds)
                b_served = b_probe["listing"] == 200 and b_probe["body"] == APP_B.name
                if b_served != (on_disk == 0):
                    run.fail(f"{where}: uid {APP_B.uid} got {b_probe}, the config on disk has app-b: {on_disk == 0}")
                if (on_disk == 0) != b_token.exists():
                    run.fail(f"{where}: app-b's token file exists: {b_token.exists()}; app-b configured: {on_disk == 0}")
                for file in [a_token, b_token] if on_disk == 0 else [a_token]:
                    status = container_status(f"http://{container}/v1/credentials", file.read_text())
                    if status != 200:
                        run.fail(f"{where}: the token in {file.name} got {status}")
                if i == iterations:
                    break
                on_disk = 1 - on_disk
                tmp = path.with_suffix(".new")
                write_config(tmp, configs[on_disk])
                tmp.replace(path)
                server.proc.send_signal(signal.SIGHUP)
                time.sleep(ctx.rng.uniform(*ctx.rng.choice(RELOAD_KILL_S)))
                # One config.loaded at start, one when the reload was applied.
                applied = server.stderr_text().count('event="config.loaded"') > 1
                run.count("kills_after_reload_applied" if applied else "kills_before_reload_applied")
                server.proc.kill()
                server.proc.wait(CLI_TIMEOUT_S)
                run.kills += 1
            trail.after_kill(f"kill {i}")
    trail.final("after the clean stop", only_verify_key(state_dir))
    return run


# --------------------------------------------------------------------------- main


RUNNERS = {"rotation": rotation, "load": load, "token-key": token_key, "reload": reload}


def campaign(args: argparse.Namespace, seed: int) -> int:
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    root = Path(tempfile.mkdtemp(prefix="imds-broker-faults-"))
    root.chmod(0o711)  # not 0700: the apps' uids must reach their token files
    runs: list[Run] = []
    began = time.monotonic()
    try:
        with start_moto(root / "moto") as moto:
            ctx = Ctx(
                args.broker, random.Random(seed), root, moto.endpoint, began + args.max_seconds, args.keep, args.widen_us
            )
            for name in scenarios:
                try:
                    runs.append(RUNNERS[name](ctx, args.iterations))
                except Exception as err:  # noqa: BLE001 (a broken scenario is a failure, the others go on)
                    run = Run(name)
                    run.fail(f"aborted: {type(err).__name__}: {err}")
                    runs.append(run)
    finally:
        failed = any(r.failures for r in runs)
        if failed or args.keep:
            print(f"kept {root} for inspection", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary = {
        "scenario": args.scenario,
        "widen_us": args.widen_us,
        "iterations": args.iterations,
        "seed": seed,
        "kills": sum(r.kills for r in runs),
        "failures": sum(len(r.failures) for r in runs),
        "seconds": round(time.monotonic() - began, 1),
        "scenarios": {
            r.name: {
                "kills": r.kills,
                "failures": len(r.failures),
                **r.counters,
                "starts_that_recovered": {k: v for k, v in r.recoveries.items() if v},
            }
            for r in runs
        },
    }
    print(json.dumps(summary))
    return 1 if summary["failures"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="rotation")
    parser.add_argument("--iterations", type=int, default=200, help="kills per scenario (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed in the summary)")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop (and fail) after this long")
    parser.add_argument("--broker", type=Path, default=BROKER_BIN, help="the binary (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and go on after a failure")
    parser.add_argument(
        "--widen-us",
        type=int,
        default=0,
        help="token-key: run the killed start under strace, each write(2) delayed this many µs",
    )
    args = parser.parse_args()
    if not 1 <= args.iterations <= 10_000:
        parser.error("--iterations must be between 1 and 10000")
    if not args.broker.exists():
        parser.error(f"{args.broker} is missing: run `cargo build --bins` first")
    if os.geteuid() != 0:
        parser.error("run as root: clients run as other uids and token files are chowned")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    return campaign(args, seed)


if __name__ == "__main__":
    sys.exit(main())
