#!/usr/bin/env bash
# Writes the manual pages and shell completions of an imds-broker binary, made by the binary
# itself from its command-line definitions (the hidden `imds-broker generate`):
#
#   deploy/gen-docs.sh [--binary PATH] [OUT]
#
#   OUT/man/imds-broker.8, imds-broker-serve.8, ... (one page per subcommand, uncompressed)
#   OUT/completions/imds-broker        bash
#   OUT/completions/_imds-broker       zsh
#   OUT/completions/imds-broker.fish   fish
#
# The defaults are target/release/imds-broker (under $CARGO_TARGET_DIR if set) and target/docs,
# where the Debian package's assets are: run `cargo build --release && deploy/gen-docs.sh`
# before `cargo deb` (cargo-deb compresses the pages). deploy/install.sh runs it too.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="${CARGO_TARGET_DIR:-$repo/target}/release/imds-broker"
out="$repo/target/docs"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        -*) echo "usage: gen-docs.sh [--binary PATH] [OUT]" >&2; exit 64 ;;
        *) out="$1"; shift ;;
    esac
done
[[ -x "$binary" ]] || { echo "gen-docs.sh: no binary at $binary (cargo build --release)" >&2; exit 1; }

rm -rf "$out/man" "$out/completions"
"$binary" generate man "$out/man"
"$binary" generate completions "$out/completions"
# bash-completion loads a command's completions from a file named after the command.
mv "$out/completions/imds-broker.bash" "$out/completions/imds-broker"
