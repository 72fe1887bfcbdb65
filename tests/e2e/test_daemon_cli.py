"""The broker's command-line contract: `check` validates a config (and its file mode)
and points at the offending line; `serve` exits 0 on SIGTERM."""

import re
import subprocess

from harness import BROKER_BIN, broker_config, start_broker, write_config

# `check` must not contact STS; nothing listens here anyway.
UNUSED_STS_ENDPOINT = "http://127.0.0.1:9"


def check(config_path):
    return subprocess.run(
        [str(BROKER_BIN), "check", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_check_accepts_the_suite_config(built, tmp_path):
    config = broker_config(listen="127.0.0.1:0", sts_endpoint=UNUSED_STS_ENDPOINT, state_dir=tmp_path / "state")
    result = check(write_config(tmp_path / "good.toml", config))

    assert result.returncode == 0, result.stderr


def test_check_reports_bad_field_with_location(built, tmp_path):
    config = broker_config(listen="127.0.0.1:0", sts_endpoint=UNUSED_STS_ENDPOINT, state_dir=tmp_path / "state")
    good_arn_line = next(line for line in config.splitlines() if line.startswith("role_arn = "))
    config = config.replace(good_arn_line, 'role_arn = "not-an-arn"', 1)
    line_number = config.splitlines().index('role_arn = "not-an-arn"') + 1
    path = write_config(tmp_path / "bad.toml", config)

    result = check(path)

    assert result.returncode == 1, result.stderr
    # PATH:LINE:COL: field: message
    assert re.search(rf"^{re.escape(str(path))}:{line_number}:\d+: \S*role_arn: \S", result.stderr, re.MULTILINE), (
        result.stderr
    )


def test_check_rejects_config_others_can_write(built, tmp_path):
    config = broker_config(listen="127.0.0.1:0", sts_endpoint=UNUSED_STS_ENDPOINT, state_dir=tmp_path / "state")
    path = write_config(tmp_path / "shared.toml", config)
    path.chmod(0o666)  # another local user could map their uid to any role

    result = check(path)

    assert result.returncode == 1, result.stderr
    assert str(path) in result.stderr, result.stderr


def test_serve_exits_zero_on_sigterm(built, moto_sts, tmp_path):
    with start_broker(tmp_path, sts_endpoint=moto_sts.endpoint) as broker:
        pass  # serving() sends SIGTERM on exit

    assert broker.proc.returncode == 0, broker.stderr_tail()
