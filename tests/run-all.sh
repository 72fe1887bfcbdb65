#!/usr/bin/env bash
# The one command that runs the whole test suite, from any cwd, on a fresh machine:
#   1. .venv/ (Python clients, moto) and tests/e2e/js/node_modules (JS client),
#      each (re)installed only when its lock/requirements changed;
#   2. cargo build of the daemon and examples/sdk_whoami (the Rust client);
#   3. cargo test, then the pytest end-to-end suite (needs root: it runs clients as
#      other uids and creates a network namespace).
# Extra arguments go to pytest, e.g. `tests/run-all.sh -k boto3 -x`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

js_dir="tests/e2e/js"

step() { printf '\n==> %s (t=%ss)\n' "$*" "$SECONDS"; }

step "Python venv (.venv: moto, boto3, aws CLI, pytest)"
bash tests/e2e/ensure-venv.sh
venv="$repo/.venv"

step "npm ci ($js_dir)"
js_stamp="$(sha256sum "$js_dir/package-lock.json" | cut -d' ' -f1)"
if [[ "$(cat "$js_dir/node_modules/.e2e-stamp" 2>/dev/null)" != "$js_stamp" ]]; then
    (cd "$js_dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$js_stamp" >"$js_dir/node_modules/.e2e-stamp"
else
    echo "up to date"
fi

step "cargo build --bins --examples"
cargo build --bins --examples

step "cargo test --all-targets"
cargo test --all-targets

step "pytest tests/e2e"
"$venv/bin/python" -m pytest tests/e2e "$@"

step "all tests passed"
