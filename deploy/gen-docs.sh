#!/usr/bin/env bash
# Writes the manual pages and shell completions of an imds-broker binary, made by the binary
# itself from its command-line definitions (the hidden `imds-broker generate`):
#
#   deploy/gen-docs.sh [--binary PATH] [OUT]
#
#   OUT/man/imds-broker.8, imds-broker-serve.8, ... (one page per subcommand, uncompressed)
#   OUT/man-gz/imds-broker.8.gz, ...   the same pages, gzip -9n (as installed)
#   OUT/completions/imds-broker        bash
#   OUT/completions/_imds-broker       zsh
#   OUT/completions/imds-broker.fish   fish
#
# The defaults are target/release/imds-broker and target/release/docs, beside it (both under
# $CARGO_TARGET_DIR if set), where the Debian package's assets are: run
# `cargo build --release && deploy/gen-docs.sh` before `cargo deb`. The assets use cargo-deb's
# `target/release/` prefix, the only one it maps to $CARGO_TARGET_DIR; it does not compress
# files from there, hence man-gz/. deploy/install.sh runs this script too.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="${CARGO_TARGET_DIR:-$repo/target}/release/imds-broker"
out="${CARGO_TARGET_DIR:-$repo/target}/release/docs"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        -*) echo "usage: gen-docs.sh [--binary PATH] [OUT]" >&2; exit 64 ;;
        *) out="$1"; shift ;;
    esac
done
[[ -x "$binary" ]] || { echo "gen-docs.sh: no binary at $binary (cargo build --release)" >&2; exit 1; }

rm -rf "$out/man" "$out/man-gz" "$out/completions"
"$binary" generate man "$out/man"
"$binary" generate completions "$out/completions"
# bash-completion loads a command's completions from a file named after the command.
mv "$out/completions/imds-broker.bash" "$out/completions/imds-broker"
# Compressed pages (reproducible: no name or time stamp in the gzip header).
mkdir -p "$out/man-gz"
for page in "$out"/man/*.8; do
    gzip -9n <"$page" >"$out/man-gz/$(basename "$page").gz"
done
