#!/usr/bin/env bash
# See imds-broker work on this machine, with nothing from AWS: starts the moto emulator as STS,
# starts the broker on a loopback port with a config that maps *your* uid to a demo role, and
# runs the unmodified `aws` CLI, with no credentials of its own, against it. Cleans up on exit.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Preparing: Python venv with moto and the aws CLI, and the broker binary"
bash tests/e2e/ensure-venv.sh
cargo build --quiet --bin imds-broker
venv="$repo/.venv"
broker="$repo/target/debug/imds-broker"

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Waits (at most 30 s) for a server to print `listening on HOST:PORT`; prints HOST:PORT.
wait_listening() {
    local file="$1" i addr
    for ((i = 0; i < 300; i++)); do
        addr="$(sed -n 's/^listening on //p' "$file" | head -n1)"
        if [[ -n "$addr" ]]; then echo "$addr"; return 0; fi
        sleep 0.1
    done
    echo "server did not start; its output:" >&2
    cat "$file" "$file.err" >&2 || true
    return 1
}

say "Starting moto (AWS emulator) as STS on loopback"
"$venv/bin/python" tests/e2e/clients/moto_sts.py >"$work/moto" 2>"$work/moto.err" &
pids+=($!)
moto="$(wait_listening "$work/moto")"
echo "moto on $moto"

uid="$(id -u)"
cat >"$work/config.toml" <<TOML
# Quickstart: the broker on loopback, moto as STS, your uid mapped to a demo role.
[server]
listen = ["127.0.0.1:0"]
state_dir = "$work/state"

[sts]
region = "us-east-1"
endpoint_url = "http://$moto"

[[app]]
name = "quickstart-demo"
role_arn = "arn:aws:iam::123456789012:role/quickstart-demo"
[app.match]
uid = $uid
TOML
chmod 600 "$work/config.toml"

say "Validating the config: imds-broker check"
"$broker" check --config "$work/config.toml"

say "Starting imds-broker (its own source credentials: a dummy key moto accepts)"
env AWS_ACCESS_KEY_ID=quickstart-source-key AWS_SECRET_ACCESS_KEY=quickstart-source-secret \
    AWS_EC2_METADATA_DISABLED=true RUST_LOG=info \
    "$broker" serve --config "$work/config.toml" >"$work/broker" 2>"$work/broker.err" &
pids+=($!)
endpoint="$(wait_listening "$work/broker")"
echo "imds-broker on $endpoint"

say "aws sts get-caller-identity, with no credentials of its own, finding them through IMDS"
echo "\$ AWS_EC2_METADATA_SERVICE_ENDPOINT=http://$endpoint aws sts get-caller-identity"
identity="$(env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
    AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_CONFIG_FILE=/dev/null \
    AWS_EC2_METADATA_SERVICE_ENDPOINT="http://$endpoint" AWS_EC2_METADATA_V1_DISABLED=true \
    AWS_DEFAULT_REGION=us-east-1 \
    "$venv/bin/aws" sts get-caller-identity --endpoint-url "http://$moto")"
echo "$identity"

say "What the broker logged (never a secret: key ids only)"
grep -E "credentials issued" "$work/broker.err" || true

say "The hash-chained audit trail: imds-broker audit verify"
kill "${pids[-1]}" && wait "${pids[-1]}" || true   # stop the broker so its audit file is complete
"$broker" audit verify "$work/state/audit.log"

if grep -q '"Arn": "arn:aws:sts::123456789012:assumed-role/quickstart-demo/' <<<"$identity"; then
    say "OK: the CLI is running as role quickstart-demo, which the broker assumed for uid $uid"
else
    say "FAILED: the CLI did not get the quickstart-demo role"
    exit 1
fi
