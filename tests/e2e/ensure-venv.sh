#!/usr/bin/env bash
# Creates (or reuses) .venv/ with the pinned Python packages of tests/e2e/requirements.txt:
# moto (the STS/S3 emulator), boto3, the aws CLI, pytest. Rebuilt only when the requirements
# or the interpreter change. Used by tests/run-all.sh and deploy/quickstart.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Debian's interpreter, not pyenv's: the e2e clients run as unprivileged uids, which cannot
# reach an interpreter under /root.
python_for_venv="${E2E_PYTHON:-/usr/bin/python3}"
venv="$repo/.venv"
requirements="$repo/tests/e2e/requirements.txt"

stamp="$(readlink -f "$python_for_venv") $(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ "$(cat "$venv/.e2e-stamp" 2>/dev/null)" != "$stamp" ]]; then
    rm -rf "$venv"
    "$python_for_venv" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$requirements"
    echo "$stamp" >"$venv/.e2e-stamp"
else
    echo "venv up to date: $venv"
fi
