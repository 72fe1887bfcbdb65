#!/usr/bin/env bash
# Installs imds-broker on a systemd host without a package manager (the .deb does the same):
# binary, units, network script, manual pages, shell completions (bash, zsh, fish), an example
# config that is never overwritten, a system user.
#
#   deploy/install.sh [--binary PATH]     (default: target/release/imds-broker)
#
# DESTDIR=/some/root installs into a staging root instead (for packaging and tests): then no
# user is created and systemd is not told.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="$repo/target/release/imds-broker"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        *) echo "usage: install.sh [--binary PATH]" >&2; exit 64 ;;
    esac
done
[[ -x "$binary" ]] || { echo "install.sh: no binary at $binary (cargo build --release)" >&2; exit 1; }
root="${DESTDIR:-}"

install -D -m 0755 "$binary" "$root/usr/bin/imds-broker"
install -D -m 0755 "$repo/deploy/imds-network.sh" "$root/usr/lib/imds-broker/imds-network.sh"
install -D -m 0644 "$repo/systemd/imds-broker.service" "$root/lib/systemd/system/imds-broker.service"
install -D -m 0644 "$repo/systemd/imds-broker-network.service" \
    "$root/lib/systemd/system/imds-broker-network.service"
install -D -m 0644 "$repo/README.md" "$root/usr/share/doc/imds-broker/README.md"
# Manual pages (compressed, as man-db finds them) and completions, made by the binary itself.
docs="$(mktemp -d)"
trap 'rm -rf "$docs"' EXIT
bash "$repo/deploy/gen-docs.sh" --binary "$binary" "$docs"
install -d -m 0755 "$root/usr/share/man/man8"
install -m 0644 "$docs"/man-gz/*.8.gz "$root/usr/share/man/man8/"
install -D -m 0644 "$docs/completions/imds-broker" \
    "$root/usr/share/bash-completion/completions/imds-broker"
install -D -m 0644 "$docs/completions/_imds-broker" "$root/usr/share/zsh/vendor-completions/_imds-broker"
install -D -m 0644 "$docs/completions/imds-broker.fish" \
    "$root/usr/share/fish/vendor_completions.d/imds-broker.fish"
install -d -m 0755 "$root/etc/imds-broker"
# One [[app]] file per package or configuration-management role ([server] include).
install -d -m 0755 "$root/etc/imds-broker/apps.d"
# The config decides which app gets which role: root-owned, not world-readable, and an
# operator's existing file is never replaced.
if [[ ! -e "$root/etc/imds-broker/config.toml" ]]; then
    install -m 0640 "$repo/deploy/config.example.toml" "$root/etc/imds-broker/config.toml"
fi
install -m 0644 "$repo/deploy/config.example.toml" "$root/usr/share/doc/imds-broker/config.example.toml"
# Unit drop-ins for the optional features (each names what it is for, and how to install it).
for dropin in container-endpoint.conf containers.conf; do
    install -m 0644 "$repo/deploy/$dropin" "$root/usr/share/doc/imds-broker/$dropin"
done

if [[ -z "$root" ]]; then
    if ! id imds-broker >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin imds-broker
    fi
    chgrp imds-broker /etc/imds-broker/config.toml
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
    fi
    echo "Installed. Edit /etc/imds-broker/config.toml, check it with"
    echo "  imds-broker check --config /etc/imds-broker/config.toml"
    echo "then: systemctl enable --now imds-broker-network imds-broker"
fi
