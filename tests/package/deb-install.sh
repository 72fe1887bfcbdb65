#!/usr/bin/env bash
# The Debian package, installed for real: builds the release binary, its manual pages and
# completions (deploy/gen-docs.sh) and the .deb (cargo-deb, installed under the target dir when
# missing), makes a throw-away Debian root with `debootstrap --variant=minbase`, installs the
# .deb there with apt (its Depends come from the mirror) and checks, each failure a message:
#
#   - the `imds-broker` system user and group (uid < 1000, no home, nologin);
#   - owners and modes: /usr/bin/imds-broker 0755, /etc/imds-broker/config.toml 0640
#     root:imds-broker (a conffile), /etc/imds-broker/apps.d 0755 root, the units and the
#     network script; `dpkg --verify` finds nothing changed;
#   - `imds-broker check` accepts the shipped config, run inside the root;
#   - `systemd-analyze verify` of both installed units, run inside the root by the root's own
#     systemd (installed there first: minbase has none), so every Exec path must exist there;
#   - every manual page gzipped in /usr/share/man/man8 and `man -l` renders one (man-db is
#     installed in the root first); bash, zsh and fish completions in place, bash's parses;
#   - `apt-get purge` leaves nothing and warns of nothing: no path of `dpkg -L` that was not
#     there before, no /etc/imds-broker; after `apt-get autoremove --purge` of the Depends, no
#     new path anywhere in the root outside apt/dpkg's records, logs, caches and /run.
#     The system user stays, as Debian packages leave theirs (files may still be owned by it).
#
#   tests/package/deb-install.sh            (as root; KEEP=1 keeps the root for a look)
#
# Needs: root (debootstrap, chroot, mount), debootstrap (installed with apt-get when missing),
# a Debian mirror (DEB_MIRROR, default: the host's apt source for
# the suite; DEB_SUITE, default bookworm) and crates.io for a missing cargo-deb. About 300 MB
# of disk under /tmp (the root) and 35 MB of package cache under the target dir. On 2 cores:
# ~35 s with a built binary, cargo-deb and a warm package cache ($target/deb-test/cache, used
# by debootstrap); ~2 min with a cold cache (debootstrap downloads); from nothing, as in CI, add
# the release build (~8 min) and `cargo install cargo-deb` (~3.5 min). So it is NOT part of
# tests/run-all.sh or .ci/run: run it by hand, or in a job of its own, after touching
# Cargo.toml's [package.metadata.deb], debian/, systemd/ or deploy/. Every step has a timeout;
# the root (/tmp/deb-install.*) is unmounted and removed on exit, whatever happened.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"
suite="${DEB_SUITE:-bookworm}"

fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }
phase_start=$SECONDS
timings=()
phase() {
    if [[ -n "${phase_name:-}" ]]; then timings+=("$(printf '%-50s %4ss' "$phase_name" $((SECONDS - phase_start)))"); fi
    phase_name="$1"
    phase_start=$SECONDS
    printf '\n==> %s (t=%ss)\n' "$1" "$SECONDS"
}
ok() { printf '  ok: %s\n' "$*"; }

[[ $EUID -eq 0 ]] || fail "run as root (debootstrap, chroot and mount need it)"

# The mirror: the host's own apt source for the suite (deb822 or one-line format).
mirror_of_host() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -e "$f" ]] || continue
        awk -v suite="$suite" '
            /^[[:space:]]*$/ { if (ok && uri) print uri; ok = 0; uri = ""; next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END { if (ok && uri) print uri }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -e "$f" ]] || continue
        awk -v suite="$suite" '$1 == "deb" { for (i = 2; i < NF; i++) if ($(i + 1) == suite && $i ~ /^https?:/) print $i }' "$f"
    done
}
mirror="${DEB_MIRROR:-$(mirror_of_host | head -n1 || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"

work="$(mktemp -d /tmp/deb-install.XXXXXX)"
root="$work/root"
cleanup() {
    local rc=$? m
    set +e
    # Nothing may stay mounted, whatever failed; then the root goes (unless KEEP=1).
    for m in "$root/proc" "$root/sys" "$root/dev/pts"; do
        if mountpoint -q "$m" 2>/dev/null; then umount -l "$m"; fi
    done
    if [[ "${KEEP:-}" == 1 ]]; then
        echo "kept: $work" >&2
    else
        rm -rf --one-file-system "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a command inside the root with a clean environment.
in_root() {
    timeout "${IN_ROOT_TIMEOUT:-120}" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"
}

# -------------------------------------------------------------------------------------------
phase "tools (cargo-deb, debootstrap)"
tools="$target/tools"
if command -v cargo-deb >/dev/null; then
    cargo_deb="$(command -v cargo-deb)"
elif [[ -x "$tools/bin/cargo-deb" ]]; then
    cargo_deb="$tools/bin/cargo-deb"
else
    echo "cargo-deb missing: cargo install cargo-deb --locked --root $tools"
    (cd /tmp && CARGO_TARGET_DIR="$target/tools-build" timeout 1800 \
        cargo install cargo-deb --locked --root "$tools") || fail "cargo install cargo-deb"
    rm -rf "$target/tools-build"   # its intermediate build, ~150 MB
    cargo_deb="$tools/bin/cargo-deb"
fi
ok "$("$cargo_deb" --version 2>&1 | head -n1) ($cargo_deb)"
if ! command -v debootstrap >/dev/null; then
    timeout 600 apt-get install -y -q debootstrap ||
        { timeout 300 apt-get update -q && timeout 600 apt-get install -y -q debootstrap; } ||
        fail "apt-get install debootstrap"
fi
ok "debootstrap $(dpkg-query -W -f '${Version}' debootstrap 2>/dev/null || true), mirror $mirror, suite $suite"

# -------------------------------------------------------------------------------------------
phase "cargo build --release"
timeout 1800 cargo build --release --locked || fail "cargo build --release"

phase "gen-docs.sh + cargo deb"
bash deploy/gen-docs.sh || fail "deploy/gen-docs.sh"
timeout 600 "$cargo_deb" --no-build --locked --output "$work/" || fail "cargo deb"
debs=("$work"/imds-broker_*.deb)
[[ -f "${debs[0]}" ]] || fail "cargo deb made no imds-broker_*.deb in $work"
deb="${debs[0]}"
ok "$(basename "$deb") ($(du -h "$deb" | cut -f1))"
dpkg-deb --field "$deb" Package Version Architecture Depends

# -------------------------------------------------------------------------------------------
phase "debootstrap --variant=minbase $suite"
cache="$target/deb-test/cache"
mkdir -p "$cache"
timeout 1200 debootstrap --variant=minbase --cache-dir="$cache" "$suite" "$root" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; fail "debootstrap (log above)"; }
ok "$(du -sh --one-file-system "$root" | cut -f1) root in $root"
mount -t proc proc "$root/proc"
# Packages installed from here on must not start anything (there is no init anyway).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"

phase "apt-get install systemd man-db (the checks' tools)"
IN_ROOT_TIMEOUT=600 in_root apt-get update -q >/dev/null || fail "apt-get update in the root"
IN_ROOT_TIMEOUT=600 in_root apt-get install -y -q --no-install-recommends systemd man-db >"$work/tools.log" 2>&1 ||
    { tail -n 30 "$work/tools.log" >&2; fail "apt-get install systemd man-db in the root"; }
ok "$(in_root dpkg-query -W -f '${Package} ${Version}  ' systemd man-db)"

# Every path in the root before the package (for the purge check).
snapshot() {
    (cd "$root" && find . -xdev \( -path ./proc -o -path ./tmp -o -path ./var/log -o -path ./var/cache \
        -o -path ./run -o -path ./var/lib/apt -o -path ./var/lib/dpkg \) -prune -o -print | sort)
}
snapshot >"$work/before"

phase "apt-get install ./imds-broker.deb"
cp "$deb" "$root/tmp/imds-broker.deb"
IN_ROOT_TIMEOUT=600 in_root apt-get install -y -q --no-install-recommends /tmp/imds-broker.deb \
    >"$work/install.log" 2>&1 || { cat "$work/install.log" >&2; fail "apt-get install of the .deb in the root (log above)"; }
grep -E '^Setting up imds-broker ' "$work/install.log" | sed 's/^/  /'
ok "with $(grep -c '^Setting up ' "$work/install.log") packages set up in all (Depends from the mirror)"
in_root dpkg-query -W -f '${Status}\n' imds-broker | grep -qx 'install ok installed' ||
    fail "imds-broker is not 'install ok installed'"
in_root dpkg -L imds-broker | sort >"$work/files"
ok "installed, $(wc -l <"$work/files") paths in dpkg -L"

# -------------------------------------------------------------------------------------------
phase "checks"
# The system user and group.
pw="$(in_root getent passwd imds-broker)" || fail "no imds-broker user (getent passwd)"
IFS=: read -r _ _ uid gid _ home shell <<<"$pw"
((uid < 1000)) || fail "imds-broker is not a system user: uid $uid ($pw)"
[[ "$home" == /nonexistent && ! -e "$root/nonexistent" ]] || fail "imds-broker has a home: $pw"
[[ "$shell" == /usr/sbin/nologin ]] || fail "imds-broker's shell is $shell, not /usr/sbin/nologin ($pw)"
grp="$(in_root getent group imds-broker)" || fail "no imds-broker group"
[[ "$(cut -d: -f3 <<<"$grp")" == "$gid" ]] || fail "imds-broker's primary group is $gid, not imds-broker ($grp)"
ok "user: $pw"

# Owners and modes, as deploy/install.sh makes them.
expect_mode() { # PATH MODE OWNER:GROUP TYPE
    local got
    got="$(in_root stat -c '%a %U:%G %F' "$1" 2>/dev/null)" || fail "$1 is missing"
    [[ "$got" == "$2 $3 $4" ]] || fail "$1 is '$got', expected '$2 $3 $4'"
    ok "$1 $2 $3"
}
expect_mode /usr/bin/imds-broker 755 root:root "regular file"
expect_mode /usr/lib/imds-broker/imds-network.sh 755 root:root "regular file"
expect_mode /etc/imds-broker 755 root:root directory
expect_mode /etc/imds-broker/config.toml 640 root:imds-broker "regular file"
expect_mode /etc/imds-broker/apps.d 755 root:root directory
expect_mode /lib/systemd/system/imds-broker.service 644 root:root "regular file"
expect_mode /lib/systemd/system/imds-broker-network.service 644 root:root "regular file"
expect_mode /usr/share/doc/imds-broker/README.md 644 root:root "regular file"
expect_mode /usr/share/doc/imds-broker/config.example.toml 644 root:root "regular file"
in_root dpkg-query -W -f '${Conffiles}\n' imds-broker | grep -q '^ /etc/imds-broker/config.toml ' ||
    fail "/etc/imds-broker/config.toml is not a conffile"
ok "config.toml is a conffile"
verify="$(in_root dpkg --verify imds-broker 2>&1)" || true
[[ -z "$verify" ]] || fail "dpkg --verify imds-broker: $verify"
ok "dpkg --verify: no file changed"
dpkg-deb --field "$deb" Depends | grep -q 'iproute2' || fail "Depends lacks iproute2"
dpkg-deb --field "$deb" Depends | grep -q 'adduser' || fail "Depends lacks adduser"
dpkg-deb --field "$deb" Depends | grep -q 'procps' || fail "Depends lacks procps (/bin/kill of ExecReload=)"

# The shipped config, checked by the shipped binary in the root.
out="$(in_root /usr/bin/imds-broker check --config /etc/imds-broker/config.toml 2>&1)" ||
    fail "imds-broker check --config /etc/imds-broker/config.toml in the root: $out"
ok "imds-broker check: $(tail -n1 <<<"$out")"
in_root /usr/bin/imds-broker --version >/dev/null || fail "imds-broker --version in the root"

# The units, verified by the root's systemd (every Exec*= program must be there: /bin/kill of
# ExecReload= comes from procps, a Depends).
out="$(in_root systemd-analyze verify \
    /lib/systemd/system/imds-broker.service /lib/systemd/system/imds-broker-network.service 2>&1)" ||
    fail "systemd-analyze verify in the root: $out"
[[ -z "$out" ]] || fail "systemd-analyze verify in the root warned: $out"
ok "systemd-analyze verify (the root's systemd $(in_root dpkg-query -W -f '${Version}' systemd)): both units clean"

# Manual pages: one per page gen-docs.sh made, gzipped, and one renders.
want="$(cd "$target/release/docs/man" && ls -- *.8 | sed 's/$/.gz/' | sort)"
have="$(cd "$root/usr/share/man/man8" && ls -- imds-broker*.8* | sort)"
[[ "$want" == "$have" ]] || fail "man8 pages differ from gen-docs.sh's: $(diff <(echo "$want") <(echo "$have") | tr '\n' ' ')"
for page in $have; do
    gzip -t "$root/usr/share/man/man8/$page" || fail "$page is not gzip"
    [[ "$(stat -c '%a %U' "$root/usr/share/man/man8/$page")" == "644 root" ]] || fail "$page is not 0644 root"
done
ok "$(wc -w <<<"$have") pages in /usr/share/man/man8, gzipped"
rendered="$(in_root env MANWIDTH=80 man --warnings=w -l /usr/share/man/man8/imds-broker-check.8.gz 2>&1)" ||
    fail "man -l imds-broker-check.8.gz: $rendered"
grep -q 'imds-broker-check' <<<"$rendered" || fail "man -l imds-broker-check.8.gz rendered no name: $rendered"
in_root man -w imds-broker >/dev/null || fail "man -w imds-broker finds no page (man-db's path)"
ok "man -l renders imds-broker-check(8) ($(wc -l <<<"$rendered") lines), man -w finds imds-broker(8)"

# Completions.
expect_mode /usr/share/bash-completion/completions/imds-broker 644 root:root "regular file"
expect_mode /usr/share/zsh/vendor-completions/_imds-broker 644 root:root "regular file"
expect_mode /usr/share/fish/vendor_completions.d/imds-broker.fish 644 root:root "regular file"
in_root bash -n /usr/share/bash-completion/completions/imds-broker || fail "bash completion does not parse"
in_root bash -c 'source /usr/share/bash-completion/completions/imds-broker && complete -p imds-broker' >/dev/null ||
    fail "bash completion registers no completion for imds-broker"
ok "bash completion parses and registers"

# -------------------------------------------------------------------------------------------
phase "apt-get purge imds-broker"
IN_ROOT_TIMEOUT=300 in_root apt-get purge -y -q imds-broker >"$work/purge.log" 2>&1 ||
    { cat "$work/purge.log" >&2; fail "apt-get purge"; }
if grep -i 'warning' "$work/purge.log"; then fail "apt-get purge warned (above)"; fi
status="$(in_root dpkg-query -W -f '${Status}' imds-broker 2>/dev/null || true)"
[[ -z "$status" || "$status" == *" not-installed" ]] || fail "dpkg still has imds-broker after purge: $status"
left=()
while read -r path; do
    [[ "$path" == /. ]] && continue
    [[ -e "$root$path" || -L "$root$path" ]] || continue
    # Through the root's own links (/lib is usr/lib on a merged-/usr system).
    canon="$(in_root readlink -f "$path")"
    grep -qxF ".$canon" "$work/before" || left+=("$path")
done <"$work/files"
((${#left[@]} == 0)) || fail "left after purge: ${left[*]}"
[[ ! -e "$root/etc/imds-broker" ]] || fail "/etc/imds-broker is left after purge: $(find "$root/etc/imds-broker")"
rm -f "$root/tmp/imds-broker.deb"
ok "purge removed all $(wc -l <"$work/files") paths, the conffile and /etc/imds-broker, without a warning"
# With the Depends apt pulled in gone too, the root is as before the package.
IN_ROOT_TIMEOUT=300 in_root apt-get autoremove --purge -y -q >"$work/autoremove.log" 2>&1 ||
    { cat "$work/autoremove.log" >&2; fail "apt-get autoremove --purge"; }
snapshot >"$work/after"
# adduser's backups of the account files are not the package's.
new="$(comm -13 "$work/before" "$work/after" | grep -vxE '\./etc/(passwd|group|shadow|gshadow|subuid|subgid)-' || true)"
[[ -z "$new" ]] || fail "new paths in the root after purge and autoremove: $(tr '\n' ' ' <<<"$new")"
ok "after autoremove of the Depends: no path in the root that was not there before the package"
in_root getent passwd imds-broker >/dev/null && ok "the imds-broker user stays (by design)"

phase "done"
printf '\nPASS: the .deb installs, checks out and purges cleanly in a %s root.\n' "$suite"
printf '  %s\n' "${timings[@]}"
printf '  %-50s %4ss\n' total "$SECONDS"
