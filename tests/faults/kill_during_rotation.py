#!/usr/bin/env python3
"""Fault campaign: `kill -9` the daemon while it rotates a container-endpoint token.

The broker runs with a container endpoint and one app; a driver calls `imds-broker token
rotate APP` back to back while the daemon is killed with SIGKILL at a random moment, then
restarted. After every restart the campaign checks what a crash must never leave behind
(see src/token/container.rs, "Crash safety"):

- no temporary file (`*.tmp`) in the token directory or the state directory;
- the token in the app's file opens the endpoint: GET /v1/credentials with it is a 200;
- `imds-broker audit verify` passes on the audit file (a torn line, which another fix is
  about, is reported as such and fails the campaign only with --strict-audit).

Needs root (token files are chowned to the app's uid), target/debug/imds-broker, and the
e2e venv (moto); run it with that venv's python. Exits 0 when every check held, 1 otherwise,
and prints one summary line of JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import APP_A, BROKER_BIN, REGION, start_moto, serve_broker, write_config  # noqa: E402

CLI_TIMEOUT_S = 15  # one `token rotate` or `audit verify`
KILL_AFTER_S = (0.0, 0.4)  # the random moment, after the daemon is listening
ROTATORS = 2  # concurrent `token rotate` loops: more rotations in flight at the kill
# What a start logs when it finds the traces of a kill (src/token/container.rs): how the
# summary shows which windows the kills hit.
RECOVERIES = {
    "temp_files_removed": "removed temporary files",
    "rotation_dropped": "cut short before its file was written",
    "rotation_finished": "recovered",
    "unknown_token_replaced": "holds a token the state does not know",
}


def broker_config(root: Path, sts_endpoint: str) -> Path:
    return write_config(
        root / "imds-broker.toml",
        f"""\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{root / 'state'}"

[sts]
region = "{REGION}"
endpoint_url = "{sts_endpoint}"

[container]
listen = ["127.0.0.1:0"]
token_dir = "{root / 'tokens'}"

[[app]]
name = "{APP_A.name}"
role_arn = "{APP_A.role_arn}"
match = {{ uid = {APP_A.uid} }}
container = {{}}
""",
    )


def get_credentials(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": token})
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def temp_files(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.is_dir() for p in d.iterdir() if p.name.endswith(".tmp"))


def audit_problem(audit: Path) -> tuple[str, str] | None:
    """None if `audit verify` passes (or there is no file yet); else (kind, detail), kind
    "torn" when some line is not whole JSON (the audit fix's business), "broken" otherwise."""
    if not audit.exists():
        return None
    result = subprocess.run(
        [str(BROKER_BIN), "audit", "verify", str(audit)], capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    if result.returncode == 0:
        return None
    detail = (result.stdout + result.stderr).strip()
    torn = []
    for number, line in enumerate(audit.read_text(errors="replace").split("\n"), start=1):
        if not line:
            continue
        try:
            json.loads(line)
        except ValueError:
            torn.append(number)
    if torn:
        return "torn", f"line(s) {torn} not whole JSON; verify said: {detail}"
    return "broken", detail


class Rotator:
    """Calls `token rotate` in `ROTATORS` loops until stopped; counts the successes."""

    def __init__(self, broker: Path, config: Path, app: str) -> None:
        self.argv = [str(broker), "token", "rotate", app, "--config", str(config)]
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


def campaign(broker: Path, iterations: int, seed: int, strict_audit: bool, max_seconds: float, keep: bool) -> int:
    rng = random.Random(seed)
    # Not under a 0700 directory: the app's uid must reach its token file.
    root = Path(tempfile.mkdtemp(prefix="imds-broker-faults-"))
    root.chmod(0o711)
    token_dir, state_dir = root / "tokens", root / "state"
    token_file, audit = token_dir / f"{APP_A.name}.token", state_dir / "audit.log"
    failures: list[str] = []
    torn: list[str] = []
    rotations = kills = 0
    seen = dict.fromkeys(RECOVERIES, 0)
    deadline = time.monotonic() + max_seconds
    try:
        with start_moto(root / "moto") as moto:
            config = broker_config(root, moto.endpoint)
            # One more start than kills: the last one only checks, then stops cleanly.
            for i in range(iterations + 1):
                if time.monotonic() > deadline:
                    failures.append(f"stopped after {i} starts: --max-seconds {max_seconds} passed")
                    break
                logs = root / "logs" / f"{i:04d}"
                with serve_broker(logs, config, binary=broker) as server:
                    _imds, container = server.wait_listening(2)
                    where = f"start {i} ({server.stderr_path})"
                    left = temp_files(token_dir, state_dir)
                    if left:
                        failures.append(f"{where}: temporary files left: {left}")
                    status = get_credentials(f"http://{container}/v1/credentials", token_file.read_text())
                    if status != 200:
                        failures.append(f"{where}: the token in the file got {status}")
                    log = server.stderr_text()
                    for kind, needle in RECOVERIES.items():
                        seen[kind] += needle in log
                    if i == iterations:
                        break  # the context stops it with SIGTERM
                    rotator = Rotator(broker, config, APP_A.name)
                    time.sleep(rng.uniform(*KILL_AFTER_S))
                    server.proc.kill()
                    server.proc.wait(CLI_TIMEOUT_S)
                    kills += 1
                    rotations += rotator.finish()
                if (problem := audit_problem(audit)) is not None:
                    kind, detail = problem
                    (torn if kind == "torn" else failures).append(f"after kill {i}: {detail}")
                if failures and not keep:
                    break
        if (problem := audit_problem(audit)) is not None:
            kind, detail = problem
            (torn if kind == "torn" else failures).append(f"after the clean stop: {detail}")
    finally:
        if failures or keep:
            print(f"kept {root} for inspection", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    for line in torn[:5]:
        print(f"TORN AUDIT {line}", file=sys.stderr)
    summary = {
        "iterations": iterations,
        "kills": kills,
        "rotations_acknowledged": rotations,
        "seed": seed,
        "failures": len(failures),
        "audit_torn": len(torn),
        "starts_that_recovered": seen,
    }
    print(json.dumps(summary))
    return 1 if failures or (strict_audit and torn) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="kills (default 200; quick: 20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed in the summary)")
    parser.add_argument("--strict-audit", action="store_true", help="a torn audit line fails the campaign")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop (and fail) after this long")
    parser.add_argument("--broker", type=Path, default=BROKER_BIN, help="the binary (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and go on after a failure")
    args = parser.parse_args()
    if not 1 <= args.iterations <= 10_000:
        parser.error("--iterations must be between 1 and 10000")
    if not args.broker.exists():
        parser.error(f"{args.broker} is missing: run `cargo build --bins` first")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    return campaign(args.broker, args.iterations, seed, args.strict_audit, args.max_seconds, args.keep)


if __name__ == "__main__":
    sys.exit(main())
