"""The quick variant of the kill campaign tests/faults/kill_campaign.py: a few `kill -9`s of the
daemon in each scenario (container-token rotation, audit batches under load, token-key and
sealing-key creation on a first start, config reload), each restart checked (no temporary file
left, tokens issued before the kill accepted, key files whole and kept, the audit file verifies
with every torn line recorded). The full campaign is run by hand (see tests/faults/README.md)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness import BROKER_BIN, PYTHON, REPO_ROOT

CAMPAIGN = REPO_ROOT / "tests" / "faults" / "kill_campaign.py"
ITERATIONS = 3  # per scenario
MAX_SECONDS = 180  # the campaign's own bound; the subprocess gets a minute more


def test_kill_campaign_quick() -> None:
    if os.geteuid() != 0:
        pytest.fail("the campaign must run as root: clients run as other uids, token files are chowned")
    if not BROKER_BIN.exists():
        pytest.fail(f"not built: {BROKER_BIN}")
    result = subprocess.run(
        [
            str(PYTHON),
            str(CAMPAIGN),
            "--scenario",
            "all",
            "--iterations",
            str(ITERATIONS),
            "--max-seconds",
            str(MAX_SECONDS),
        ],
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS + 60,
    )
    # The summary line shows in pytest's output with -s or on failure.
    print(result.stdout, result.stderr)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kills"] == 4 * ITERATIONS, summary
    assert set(summary["scenarios"]) == {"rotation", "load", "token-key", "reload"}, summary
