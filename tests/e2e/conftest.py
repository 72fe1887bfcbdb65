"""Fixtures for the end-to-end suite: one moto (as STS) and one imds-broker shared by
the session, private homes for the client uids, and callables that run a real SDK
client or a raw IMDS probe as a given uid against that broker.

Run through tests/run-all.sh, which builds the binaries and the venv these expect.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest

from harness import (
    BROKER_BIN,
    CLIENT_UIDS,
    JS_DIR,
    NODE,
    PYTHON,
    RUST_WHOAMI_BIN,
    Callers,
    IdentityLab,
    Rule,
    Server,
    describe,
    identity_lab,
    run_as,
    start_broker,
    start_moto,
)

# What each client uid must be able to read or execute. Anything under a directory
# it cannot traverse (e.g. a repo cloned under /root) fails here with a clear message
# instead of as a confusing SDK error later.
CLIENT_PREREQUISITES = {
    str(PYTHON): os.X_OK,
    str(RUST_WHOAMI_BIN): os.X_OK,
    str(NODE): os.X_OK,
    str(JS_DIR / "node_modules" / "@aws-sdk" / "client-sts" / "package.json"): os.R_OK,
}


@pytest.fixture(scope="session")
def built() -> None:
    missing = [str(p) for p in (BROKER_BIN, RUST_WHOAMI_BIN, JS_DIR / "node_modules") if not p.exists()]
    if missing:
        pytest.fail(f"not built: {', '.join(missing)}; run tests/run-all.sh (it builds and installs everything)")


@pytest.fixture(scope="session")
def client_homes(built: None) -> Iterator[dict[int, Path]]:
    """A private HOME (mode 0700, owned by the uid) for each client uid."""
    if os.geteuid() != 0:
        pytest.fail("the e2e suite must run as root: it runs clients as other uids and creates network namespaces")
    # Not under pytest's tmp_path: that tree is 0700 root, which other uids cannot enter.
    root = Path(tempfile.mkdtemp(prefix="imds-broker-e2e-homes-"))
    try:
        root.chmod(0o711)
        homes = {}
        for uid in CLIENT_UIDS:
            home = root / str(uid)
            home.mkdir(mode=0o700)
            os.chown(home, uid, uid)
            homes[uid] = home
            check_client_prerequisites(uid, home)
        yield homes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_client_prerequisites(uid: int, home: Path) -> None:
    script = (
        "import os, sys, boto3, awscli\n"
        f"needed = {CLIENT_PREREQUISITES!r}\n"
        "bad = [p for p, mode in needed.items() if not os.access(p, mode)]\n"
        "sys.exit('cannot access: ' + ', '.join(bad) if bad else 0)\n"
    )
    try:
        result = run_as(uid, [str(PYTHON), "-c", script], {"HOME": str(home), "PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError) as err:
        pytest.fail(f"cannot run {PYTHON} as uid {uid}: {err}")
    if result.returncode != 0:
        pytest.fail(
            f"uid {uid} cannot use the test clients (the repo, .venv/ and node_modules/ must be "
            f"readable by other users, and .venv/ built on /usr/bin/python3):\n{describe(result)}"
        )


@pytest.fixture(scope="session")
def moto_sts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def broker(built: None, moto_sts: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_broker(tmp_path_factory.mktemp("broker"), sts_endpoint=moto_sts.endpoint) as server:
        yield server


@pytest.fixture(scope="session")
def callers(broker: Server, moto_sts: Server, client_homes: dict[int, Path]) -> Callers:
    """Runs clients and raw probes as the client uids against the session broker."""
    return Callers(client_homes, sts_endpoint=moto_sts.endpoint, imds_endpoint=broker.endpoint)


@pytest.fixture(scope="module")
def make_identity_lab(
    built: None, client_homes: dict[int, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Sequence[Rule], dict[str, bytes]], IdentityLab]]:
    """Starts harness.identity_lab() for a module's rules and executables; torn down
    (broker, namespaces, cgroups, clients) at the end of the module."""
    with ExitStack() as stack:

        def make(rules: Sequence[Rule], executables: dict[str, bytes]) -> IdentityLab:
            workdir = tmp_path_factory.mktemp("identity")
            try:
                return stack.enter_context(identity_lab(workdir, client_homes, rules, executables))
            except PermissionError as err:
                pytest.skip(f"this machine does not let the suite create a network namespace: {err}")

        yield make
