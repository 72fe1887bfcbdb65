"""The quick variant of the fault campaign tests/faults/kill_during_rotation.py: 10 `kill -9`s
of the daemon while it rotates a container token, each restart checked (no temporary file
left, the token in the file accepted, the audit file verifies). The full campaign is run by
hand (see tests/faults/README.md)."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness import BROKER_BIN, PYTHON, REPO_ROOT

CAMPAIGN = REPO_ROOT / "tests" / "faults" / "kill_during_rotation.py"
ITERATIONS = 10
MAX_SECONDS = 240  # the campaign's own bound; the subprocess gets a minute more


def test_kill_during_rotation_quick() -> None:
    if os.geteuid() != 0:
        pytest.fail("the campaign must run as root: token files are chowned to the app's uid")
    if not BROKER_BIN.exists():
        pytest.fail(f"not built: {BROKER_BIN}")
    result = subprocess.run(
        [str(PYTHON), str(CAMPAIGN), "--iterations", str(ITERATIONS), "--max-seconds", str(MAX_SECONDS)],
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS + 60,
    )
    # The summary line (and any TORN AUDIT report) shows in pytest's output with -s or on failure.
    print(result.stdout, result.stderr)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
