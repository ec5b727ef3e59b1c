#!/bin/bash
# setup.sh - prepare this machine for tcpstates, then run the tracer or the tests.
#
#   bash setup.sh               set up only
#   bash setup.sh run [ARGS]    set up, then run tcpstates.py ARGS (as root)
#   bash setup.sh test [ARGS]   set up, then run the whole test suite (pytest ARGS)
#
# Idempotent: a second run installs nothing and takes well under a second.
# Everything it says goes to stderr, so `bash setup.sh run -s | consumer` stays clean.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3
say() { echo "setup: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs packages and mounts tracefs); try: sudo bash $0 $*"
    exit 1
fi

# --- Debian packages -------------------------------------------------------
# python3-bpfcc: BCC's Python bindings; python3-systemd: the journal tests;
# pytest and hypothesis for the tests, all for Debian's own /usr/bin/python3;
# systemd-journal-remote for the journal forwarding test; make, groff and
# man-db for the install and man page tests (systemd-analyze verify runs man
# to check the unit's Documentation= link); gcc to build bench/loadgen.c, which the
# load tests use; python3-prometheus-client for --metrics and --metrics-file, and
# Prometheus (server and promtool) and node_exporter for the metrics tests, which
# start their own on 127.0.0.1 (see "Services" below).
pkgs=(python3-bpfcc python3-systemd python3-pytest python3-hypothesis
      systemd-journal-remote make groff-base man-db gcc libc6-dev
      python3-prometheus-client prometheus prometheus-node-exporter)
services=(prometheus prometheus-node-exporter)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=
apt_update() {
    [ -n "$apt_updated" ] && return 0
    say "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
}
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    say "installing ${missing[*]}"
    # Services: installing prometheus or prometheus-node-exporter would start
    # them (on *:9090 and *:9100, for everyone) through invoke-rc.d, which runs
    # their init scripts where systemd is not PID 1. A policy-rc.d that refuses
    # every start is in place while apt runs, unless the host has its own.
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# from tcpstates setup.sh: no service starts during its install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        made_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    if [ -n "$made_policy" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    # Should one have started all the same (a host policy that allows it),
    # stop it: only those installed just now.
    for svc in "${services[@]}"; do
        case " ${missing[*]} " in *" $svc "*) ;; *) continue ;; esac
        if [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1; then
            say "stopping $svc, started by its package"
            "/etc/init.d/$svc" stop >&2 || true
        fi
    done
fi

# --- Kernel headers ----------------------------------------------------------
# BCC compiles its C program against /lib/modules/$(uname -r)/build. The right
# headers are those of the running kernel; when the distribution has no package
# for it (a custom kernel, as on these VMs), the distribution's generic headers
# are wired in instead. That is safe for tcpstates, whose program reads only the
# tracepoint's own fields (BCC builds that struct from tracefs at run time).
kver=$(uname -r)
kdir=/lib/modules/$kver
if [ ! -e "$kdir/build/include/generated/autoconf.h" ] && [ ! -e "$kdir/build/include/linux/kconfig.h" ]; then
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1 || { apt_update; apt-cache show "linux-headers-$kver" >/dev/null 2>&1; }; then
        say "installing linux-headers-$kver (headers of the running kernel)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >&2
    else
        say "no headers package for kernel $kver; using the distribution's generic headers (linux-headers-amd64)"
        if ! dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed'; then
            apt_update
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-headers-amd64 >&2
        fi
    fi
fi
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
    gen=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$gen" ]; then
        say "no kernel headers found under /usr/src; install linux-headers-amd64 and run again"
        exit 1
    fi
    common=${gen%-amd64}-common
    mkdir -p "$kdir"
    ln -sfn "$gen" "$kdir/build"
    [ -d "$common" ] && ln -sfn "$common" "$kdir/source"
    say "kernel headers: $kdir/build -> $gen (generic headers; kernel is $kver)"
fi

# --- tracefs -------------------------------------------------------------
if [ ! -e /sys/kernel/tracing/events ] && [ ! -e /sys/kernel/debug/tracing/events ]; then
    say "mounting tracefs at /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing
fi

mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in
    "") say "ready" ;;
    run) exec "$PY" "$here/tcpstates.py" "$@" ;;
    test) cd "$here" && exec "$PY" -m pytest "$@" ;;
    *) say "unknown mode '$mode': use run or test"; exit 2 ;;
esac
