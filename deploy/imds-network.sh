#!/usr/bin/env bash
# Puts the IMDS address where applications look for it, or, on EC2, sends their IMDS traffic to
# the broker; and removes all of it again. Fails closed: with the broker down, applications get
# "connection refused", never the host's own IMDS role.
#
#   imds-network.sh up|down|status [--mode auto|local|ec2] [--broker-port PORT] [--broker-user USER]
#
# local: a dummy interface `imds0` holding 169.254.169.254/32 and fd00:ec2::254/128, for a broker
#        listening on those addresses (port 80), and the container-credentials addresses
#        169.254.170.23/32 and fd00:ec2::23/128 (for a [container] endpoint on its default
#        address). Where the kernel has no dummy link type (some containers), the addresses go
#        on `lo` instead, and the script says so.
# ec2:   an nftables table `inet imds_broker` that DNATs TCP to 169.254.169.254:80 and
#        [fd00:ec2::254]:80 from every local process except those of --broker-user to the broker
#        on 127.0.0.1/[::1]:--broker-port. The broker's own user still reaches the real IMDS for
#        its source credentials.
# auto:  ec2 when the DMI data says this is an EC2 instance, local otherwise (the default).
# Settings may also come from the environment (MODE, BROKER_PORT, BROKER_USER), as in
# systemd/imds-broker-network.service.
set -euo pipefail

IMDS_V4=169.254.169.254
IMDS_V6=fd00:ec2::254
CONTAINER_V4=169.254.170.23
CONTAINER_V6=fd00:ec2::23
DEVICE=imds0
TABLE=imds_broker

die() { echo "imds-network: $*" >&2; exit 1; }
say() { echo "imds-network: $*"; }

action="${1:-}"
[[ $# -gt 0 ]] && shift
mode="${MODE:-auto}"
broker_port="${BROKER_PORT:-8169}"
broker_user="${BROKER_USER:-imds-broker}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mode) mode="$2"; shift 2 ;;
        --broker-port) broker_port="$2"; shift 2 ;;
        --broker-user) broker_user="$2"; shift 2 ;;
        *) die "unknown argument: $1" ;;
    esac
done

is_ec2() {
    local dmi=/sys/class/dmi/id
    grep -qs "Amazon EC2" "$dmi/sys_vendor" || grep -qs "^i-" "$dmi/board_asset_tag" \
        || grep -qis "^ec2" "$dmi/product_uuid"
}

if [[ "$mode" == auto ]]; then
    if is_ec2; then mode=ec2; else mode=local; fi
fi
[[ "$mode" == local || "$mode" == ec2 ]] || die "--mode must be auto, local or ec2"

ipv6_enabled() { [[ -e /proc/net/if_inet6 ]] && [[ "$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null || echo 1)" == 0 ]]; }

local_up() {
    local dev="$DEVICE"
    if ! ip link show "$DEVICE" >/dev/null 2>&1; then
        if ip link add "$DEVICE" type dummy 2>/dev/null; then
            ip link set "$DEVICE" up
        else
            dev=lo
            ip link set lo up
            say "no dummy link type in this kernel or container: adding the IMDS addresses to lo"
        fi
    fi
    ip addr replace "$IMDS_V4/32" dev "$dev"
    ip addr replace "$CONTAINER_V4/32" dev "$dev"
    if ipv6_enabled; then
        ip -6 addr replace "$IMDS_V6/128" dev "$dev" nodad
        ip -6 addr replace "$CONTAINER_V6/128" dev "$dev" nodad
    fi
    say "local: $IMDS_V4, $CONTAINER_V4 (and $IMDS_V6, $CONTAINER_V6) on $dev"
}

local_down() {
    if ip link show "$DEVICE" >/dev/null 2>&1; then
        ip link del "$DEVICE"
    fi
    ip addr del "$IMDS_V4/32" dev lo 2>/dev/null || true
    ip addr del "$CONTAINER_V4/32" dev lo 2>/dev/null || true
    ip -6 addr del "$IMDS_V6/128" dev lo 2>/dev/null || true
    ip -6 addr del "$CONTAINER_V6/128" dev lo 2>/dev/null || true
    say "local: IMDS addresses removed"
}

ec2_up() {
    command -v nft >/dev/null || die "nft not found: install nftables"
    local uid
    uid="$(id -u "$broker_user" 2>/dev/null)" || {
        [[ "$broker_user" =~ ^[0-9]+$ ]] || die "no such user: $broker_user"
        uid="$broker_user"
    }
    [[ "$broker_port" =~ ^[0-9]+$ ]] || die "--broker-port must be a number"
    # One atomic transaction: the table is replaced whole, never half-installed.
    nft -f - <<NFT
table inet $TABLE
delete table inet $TABLE
table inet $TABLE {
    chain output {
        type nat hook output priority -100; policy accept;
        ip daddr $IMDS_V4 tcp dport 80 meta skuid != $uid dnat ip to 127.0.0.1:$broker_port
        ip6 daddr $IMDS_V6 tcp dport 80 meta skuid != $uid dnat ip6 to [::1]:$broker_port
    }
}
NFT
    say "ec2: IMDS traffic of every uid but $uid goes to the broker on port $broker_port"
}

ec2_down() {
    if command -v nft >/dev/null && nft list table inet "$TABLE" >/dev/null 2>&1; then
        nft delete table inet "$TABLE"
    fi
    say "ec2: redirect removed"
}

status() {
    ip -br addr show | grep -E "$IMDS_V4|$IMDS_V6|$CONTAINER_V4|$CONTAINER_V6" || echo "no IMDS address on any interface"
    if command -v nft >/dev/null; then
        nft list table inet "$TABLE" 2>/dev/null || echo "no nftables redirect"
    fi
}

case "$action" in
    up) "${mode}_up" ;;
    down) "${mode}_down" ;;
    status) status ;;
    *) die "usage: imds-network.sh up|down|status [--mode auto|local|ec2] [--broker-port PORT] [--broker-user USER]" ;;
esac
