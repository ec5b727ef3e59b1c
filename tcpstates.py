#!/usr/bin/python3
#
# tcpstates   Trace TCP socket state changes, with the time spent in the
#             previous state. For Linux, uses BCC and eBPF.
#
# Traces the sock:inet_sock_set_state tracepoint (Linux 4.16 and later; the
# tracepoint itself is required, there is no kprobe fallback). TCP only, IPv4
# and IPv6.
#
# Licensed under the Apache License, Version 2.0 (the "License").
# See the LICENSE file beside this one.
"""Trace TCP state changes live, with the time each socket spent in its
previous state.

The module is importable without BCC or root: ``bcc`` is imported only by the
runtime, so the argument parsing, decoding and formatting below can be tested
anywhere. Run it as root with Debian's /usr/bin/python3 (which sees
python3-bpfcc).
"""

import argparse
import collections
import bisect
import csv
import ctypes
import json
import operator
import os
import signal
import socket
import struct
import sys
import time

PROG = "tcpstates"

# TCP states as numbered in the kernel's include/net/tcp_states.h.
# BOUND_INACTIVE (13) arrived in Linux 6.10; anything newer prints as a number.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}
TCP_CLOSE = 7
TCP_LISTEN = 10


def state_name(number):
    """Name of a kernel TCP state number; unknown numbers print as digits."""
    return TCP_STATES.get(number) or str(number)


# Other spellings accepted on the command line: ss(8)'s names (ESTAB,
# SYN-SENT, FIN-WAIT-1, UNCONN, ...), and dashes for underscores.
STATE_ALIASES = {
    "ESTAB": 1, "SYN_RECEIVED": 3, "FIN_WAIT_1": 4, "FIN_WAIT_2": 5,
    "CLOSED": 7, "UNCONN": 7, "SYN_RCVD": 3,
}


def state_number(name):
    """The state number for a name as this tool or ss(8) prints it, any case."""
    key = name.strip().upper().replace("-", "_")
    for number, known in TCP_STATES.items():
        if known == key:
            return number
    return STATE_ALIASES.get(key)


def state_list(text):
    """Parse "SYN_SENT,syn-recv" into a sorted tuple of state numbers; for
    argparse's type=."""
    numbers = set()
    for item in text.split(","):
        number = state_number(item)
        if number is None:
            raise argparse.ArgumentTypeError(
                "unknown TCP state %r; valid states: %s" % (
                    item.strip(), ", ".join(TCP_STATES[n] for n in sorted(TCP_STATES))))
        numbers.add(number)
    return tuple(sorted(numbers))


def state_mask(numbers):
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


# Columns as the upstream bcc tool prints them, so that scripts keep working.
# Each entry: (title, printf conversion for the table, wide-mode conversion).
# The same conversion formats the header and the rows, so they cannot drift.
TABLE_COLUMNS = (
    ("SKADDR", "%-16s", "%-16s"),
    ("C-PID", "%-5s", "%-5s"),
    ("C-COMM", "%-10.10s", "%-16.16s"),
    ("IP", None, "%-2s"),            # wide mode only
    ("LADDR", "%-15s", "%-26s"),
    ("LPORT", "%-5s", "%-5s"),
    ("RADDR", "%-15s", "%-26s"),
    ("RPORT", "%-5s", "%-5s"),
    ("OLDSTATE", "%-11s", "%-11s"),
    ("->", "%s", "%s"),
    ("NEWSTATE", "%-11s", "%-11s"),
    ("MS", "%s", "%s"),
)
TIME_COLUMN = ("TIME", "%-8s")
TIMESTAMP_COLUMN = ("TIME(s)", "%-9s")
CSV_COLUMNS = ("SKADDR", "C-PID", "C-COMM", "IP", "LADDR", "LPORT", "RADDR",
               "RPORT", "OLDSTATE", "NEWSTATE", "MS")
# -x/--extended appends the socket's owner. In the table, MS then gets a
# width so that the owner columns line up.
EXTENDED_COLUMNS = (
    ("O-PID", "%-7s"),
    ("O-COMM", "%-16.16s"),
    ("CGROUP", "%s"),
)
EXTENDED_MS = "%-10s"
UNKNOWN = "-"

# ---------------------------------------------------------------------------
# The BPF program. It is static text: options reach it as -D defines (cflags)
# and as port sets held in BPF maps, never by editing this string.
# ---------------------------------------------------------------------------
BPF_PROGRAM = r"""
/*
 * tcpstates: one event per TCP state change, from sock:inet_sock_set_state.
 *
 * No kernel header is included: the few constants needed are spelled out
 * below, and BCC builds the tracepoint's argument struct (args->...) from
 * tracefs at run time. Including net/sock.h and friends would triple the
 * compile time and tie the program to one kernel's struct layouts, which it
 * never reads.
 */
#define AF_INET          2
#define AF_INET6         10
#define IPPROTO_TCP      6
#define TCP_ESTABLISHED  1
#define TCP_SYN_SENT     2
#define TCP_SYN_RECV     3
#define TCP_FIN_WAIT1    4
#define TCP_CLOSE        7
#define TCP_CLOSE_WAIT   8
#define TCP_LAST_ACK     9
#define TCP_LISTEN       10

#ifndef MAX_SOCKETS
#define MAX_SOCKETS 131072
#endif
#define MAX_LISTEN_PORTS 16384

/* event.flags */
#define SPAN_KNOWN       1
#define OWNER_KNOWN      2
#define OWNER_INHERITED  4   /* an accepted socket, owner taken from its listener */

/* One layout for IPv4 and IPv6 (IPv4 uses the first 4 bytes of each
 * address). Every byte is named, so no padding reaches user space unset. */
struct event {
    u64 ts_ns;          /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 skaddr;
    u64 span_us;        /* time in the previous state, 0 if unknown */
    u32 pid;            /* on-CPU task (tgid): see the C-PID caveat */
    u32 opid;           /* the socket's owner (tgid), 0 if unknown */
    u16 lport;
    u16 rport;
    u16 family;
    u16 oldstate;
    u16 newstate;
    u16 flags;
    u8 laddr[16];
    u8 raddr[16];
    char comm[16];
    char ocomm[16];
    u32 pad;
};

/* What is known of a live socket: since when it is in its state, and who
 * owns it. LRU: on a host with more live sockets than MAX_SOCKETS the least
 * recently changed are evicted, and their next span and owner are reported
 * as unknown, never as wrong. */
struct sock_info {
    u64 since;
    u32 opid;
    u32 oflags;
    char ocomm[16];
};
BPF_TABLE("lru_hash", u64, struct sock_info, sockets, MAX_SOCKETS);

/* Owners of listening sockets, by (family << 16 | port): an accepted socket's
 * first event (LISTEN -> SYN_RECV) names only its own address, and the
 * tracepoint gives no link to its listener. count is the number of listeners
 * on the key; when listeners of different processes share a key (SO_REUSEPORT,
 * or the same port in two network namespaces) opid is 0: unknown, not a
 * guess. User space seeds it with the listeners that predate the tracer. */
struct listener {
    u32 opid;
    u32 count;
    char ocomm[16];
};
BPF_TABLE("lru_hash", u32, struct listener, listeners, MAX_LISTEN_PORTS);

/* Port sets for -L and -D, as bitmaps: bit (port & 63) of word (port >> 6).
 * Filled from Python before the program is attached. */
BPF_ARRAY(local_ports, u64, 1024);
BPF_ARRAY(remote_ports, u64, 1024);

BPF_PERF_OUTPUT(events);

/*
 * Transitions that only the socket's own process makes, inside one of its
 * system calls (from the kernel's net/ipv4 code):
 *   CLOSE -> SYN_SENT        tcp_v4_connect / tcp_v6_connect: connect(), or
 *                            sendmsg() with MSG_FASTOPEN
 *   CLOSE -> LISTEN          inet_csk_listen_start: listen()
 *   ESTABLISHED -> FIN_WAIT1 tcp_close_state, called only by tcp_close and
 *   SYN_RECV -> FIN_WAIT1    tcp_shutdown: close() of the last descriptor,
 *   CLOSE_WAIT -> LAST_ACK   or shutdown()
 *   LISTEN -> CLOSE          tcp_close / tcp_disconnect of a listener (no
 *                            packet changes a listener's state)
 * Every other transition can run in softirq context on behalf of an arriving
 * packet or a timer, where the on-CPU task is unrelated to the socket.
 * Known exceptions, documented: `ss -K` (sock_destroy) closes another
 * process's socket, and MPTCP closes its subflows from a kernel worker.
 */
static inline int by_own_syscall(int oldstate, int newstate)
{
    switch (newstate) {
    case TCP_SYN_SENT:
    case TCP_LISTEN:
        return oldstate == TCP_CLOSE;
    case TCP_FIN_WAIT1:
        return oldstate == TCP_ESTABLISHED || oldstate == TCP_SYN_RECV;
    case TCP_LAST_ACK:
        return oldstate == TCP_CLOSE_WAIT;
    case TCP_CLOSE:
        return oldstate == TCP_LISTEN;
    }
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    /* The tracepoint also fires for SCTP (132) and MPTCP (262). */
    if (args->protocol != IPPROTO_TCP)
        return 0;
    u16 family = args->family;
#ifdef FILTER_FAMILY
    if (family != FILTER_FAMILY)
        return 0;
#endif

    struct event ev = {};
    u64 sk = (u64)args->skaddr;
    int oldstate = args->oldstate;
    int newstate = args->newstate;
    u64 now = bpf_ktime_get_ns();
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    u16 lport = args->sport;
    u32 lkey = ((u32)family << 16) | lport;

    /* A socket leaving CLOSE, or a child socket making its first move
     * (LISTEN -> SYN_RECV: it was cloned from the listener a moment ago),
     * starts a new life: an entry under this address belongs to an earlier
     * socket that the kernel freed at the same address, and is replaced. */
    int fresh = oldstate == TCP_CLOSE ||
                (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV);
    struct sock_info blank = {};
    struct sock_info *info = 0;
    int stored = 0;
    if (!fresh)
        info = sockets.lookup(&sk);
    if (info) {
        stored = 1;
        if (now >= info->since) {
            ev.span_us = (now - info->since) / 1000;
            ev.flags = SPAN_KNOWN;
        }
    } else {
        info = &blank;
        if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
            struct listener *l = listeners.lookup(&lkey);
            if (l && l->opid) {
                info->opid = l->opid;
                info->oflags = OWNER_KNOWN | OWNER_INHERITED;
                __builtin_memcpy(info->ocomm, l->ocomm, sizeof(info->ocomm));
            }
        }
    }
    /* pid 0 is the idle task: never an owner. */
    if (pid && by_own_syscall(oldstate, newstate)) {
        info->opid = pid;
        info->oflags = OWNER_KNOWN;
        bpf_get_current_comm(&info->ocomm, sizeof(info->ocomm));
    }
    ev.opid = info->opid;
    ev.flags |= info->oflags;
    __builtin_memcpy(ev.ocomm, info->ocomm, sizeof(ev.ocomm));

    /* Bookkeeping for every TCP socket, also those the filters below hide:
     * a socket's first events can carry port 0 (a client's local port is
     * chosen during connect), and its later spans and owner must be right. */
    if (newstate == TCP_CLOSE) {
        if (stored)
            sockets.delete(&sk);
    } else {
        info->since = now;
        if (!stored)
            sockets.update(&sk, info);
    }
    if (newstate == TCP_LISTEN) {
        struct listener *l = listeners.lookup(&lkey);
        if (l) {
            l->count++;
            if (l->opid != ev.opid)
                l->opid = 0;
        } else {
            struct listener fresh_l = {.opid = ev.opid, .count = 1};
            __builtin_memcpy(fresh_l.ocomm, ev.ocomm, sizeof(fresh_l.ocomm));
            listeners.update(&lkey, &fresh_l);
        }
    } else if (oldstate == TCP_LISTEN && newstate == TCP_CLOSE) {
        struct listener *l = listeners.lookup(&lkey);
        if (l) {
            if (l->count <= 1)
                listeners.delete(&lkey);
            else
                l->count--;
        }
    }

    u16 rport = args->dport;
#ifdef FILTER_LPORT
    {
        u32 word = lport >> 6;
        u64 *bits = local_ports.lookup(&word);
        if (!bits || !(*bits & (1ULL << (lport & 63))))
            return 0;
    }
#endif
#ifdef FILTER_RPORT
    {
        u32 word = rport >> 6;
        u64 *bits = remote_ports.lookup(&word);
        if (!bits || !(*bits & (1ULL << (rport & 63))))
            return 0;
    }
#endif
#ifdef FILTER_PID
    if (ev.opid != FILTER_PID)
        return 0;
#endif
    /* State masks: bit n selects state n (states are 1..13 today). */
#ifdef FILTER_OLDSTATES
    if (oldstate < 0 || oldstate > 31 || !((FILTER_OLDSTATES >> oldstate) & 1))
        return 0;
#endif
#ifdef FILTER_NEWSTATES
    if (newstate < 0 || newstate > 31 || !((FILTER_NEWSTATES >> newstate) & 1))
        return 0;
#endif
#ifdef FILTER_MIN_SPAN_US
    /* An unknown span cannot be shown to be long enough. */
    if (!(ev.flags & SPAN_KNOWN) || ev.span_us < FILTER_MIN_SPAN_US)
        return 0;
#endif

    ev.ts_ns = now;
    ev.skaddr = sk;
    ev.pid = pid;
    ev.lport = lport;
    ev.rport = rport;
    ev.family = family;
    ev.oldstate = oldstate;
    ev.newstate = newstate;
    if (family == AF_INET) {
        __builtin_memcpy(ev.laddr, args->saddr, 4);
        __builtin_memcpy(ev.raddr, args->daddr, 4);
    } else {
        __builtin_memcpy(ev.laddr, args->saddr_v6, 16);
        __builtin_memcpy(ev.raddr, args->daddr_v6, 16);
    }
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    events.perf_submit(args, &ev, sizeof(ev));
    return 0;
}

#ifdef HAVE_TCP_DESTROY_SOCK
/* A socket is forgotten at CLOSE. If that event never reached us (the
 * kernel skips a tracepoint hit while another BPF program runs on the CPU),
 * its entry would stay until the LRU evicts it: the socket's destruction
 * removes it for sure. */
TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
    u64 sk = (u64)args->skaddr;
    sockets.delete(&sk);
    return 0;
}
#endif
"""

# struct event, as laid out above (little-endian, no implicit padding).
EVENT_STRUCT = struct.Struct("<QQQIIHHHHHH16s16s16s16s4x")
SPAN_KNOWN = 1          # event.flags, as in the C program (OWNER_INHERITED,
OWNER_KNOWN = 2         # 4, is set there but not shown)

Event = collections.namedtuple("Event", (
    "ts_ns", "skaddr", "span_us", "pid", "opid", "lport", "rport", "family",
    "oldstate", "newstate", "flags", "laddr", "raddr", "comm", "ocomm"))

TRACEPOINT = "sock:inet_sock_set_state"
DESTROY_TRACEPOINT = "tcp:tcp_destroy_sock"     # Linux 4.16; optional
DESTROY_HOOK_FLAG = "-DHAVE_TCP_DESTROY_SOCK=1"
TRACEFS_CANDIDATES = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")
DEFAULT_PERF_PAGES = 256        # per CPU: 1 MiB, about 10,000 events
POLL_TIMEOUT_MS = 50            # a lone event shows within about this long
WAKEUP_EVENTS = 64              # reader wake-ups: one per this many events
REORDER_MARGIN_NS = 2_000_000   # see Reorderer
WRITE_GRACE_S = 2.0             # see Tracer.request_stop


class UsageError(Exception):
    """A bad option or argument: exit status 2."""


class Fatal(Exception):
    """A runtime failure with a one-line explanation: exit status 1."""


class StoppedWhileWriting(Exception):
    """A stop signal arrived while a write to stdout was blocked."""


# ---------------------------------------------------------------------------
# Pure helpers: no BCC, no root.
# ---------------------------------------------------------------------------
def port_list(text):
    """Parse "80,443" into a sorted tuple of ports; for argparse's type=."""
    ports = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise argparse.ArgumentTypeError(
                "invalid port list %r: empty item (write ports as 80,443)" % text)
        if not item.isdigit() or not item.isascii():
            raise argparse.ArgumentTypeError(
                "invalid port %r: ports are numbers from 1 to 65535" % item)
        port = int(item)
        if not 1 <= port <= 65535:
            raise argparse.ArgumentTypeError(
                "invalid port %s: ports are numbers from 1 to 65535" % item)
        ports.append(port)
    return tuple(sorted(set(ports)))


def port_bitmap(ports):
    """The 1024 64-bit words of a port set, as the BPF program reads them."""
    words = [0] * 1024
    for port in ports:
        words[port >> 6] |= 1 << (port & 63)
    return words


def bpf_cflags(args):
    """The -D defines that configure the BPF program for these options."""
    flags = []
    if args.ipv4:
        flags.append("-DFILTER_FAMILY=%d" % socket.AF_INET)
    elif args.ipv6:
        flags.append("-DFILTER_FAMILY=%d" % socket.AF_INET6)
    if args.localport:
        flags.append("-DFILTER_LPORT=1")
    if args.remoteport:
        flags.append("-DFILTER_RPORT=1")
    if args.pid:
        flags.append("-DFILTER_PID=%d" % args.pid)
    if args.from_states:
        flags.append("-DFILTER_OLDSTATES=0x%xU" % state_mask(args.from_states))
    if args.to_states:
        flags.append("-DFILTER_NEWSTATES=0x%xU" % state_mask(args.to_states))
    if args.min_span is not None:
        flags.append("-DFILTER_MIN_SPAN_US=%dULL" % round(args.min_span * 1000))
    if getattr(args, "max_sockets", None):
        flags.append("-DMAX_SOCKETS=%d" % args.max_sockets)
    if tracepoint_exists(DESTROY_TRACEPOINT):
        flags.append(DESTROY_HOOK_FLAG)
    return flags


def ebpf_listing(args):
    """What --ebpf prints: the cflags, the port maps' contents, the program."""
    lines = ["// cflags: %s" % (" ".join(bpf_cflags(args)) or "(none)")]
    if args.localport:
        lines.append("// local_ports map: %s" % ",".join(map(str, args.localport)))
    if args.remoteport:
        lines.append("// remote_ports map: %s" % ",".join(map(str, args.remoteport)))
    return "\n".join(lines) + "\n" + BPF_PROGRAM


def existing_listeners(proc="/proc"):
    """{(family, port): count} of the listening TCP sockets in this network
    namespace, from /proc/net/tcp and /proc/net/tcp6."""
    found = collections.Counter()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open("%s/net/%s" % (proc, name)) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":      # TCP_LISTEN
                        found[(family, int(parts[1].rsplit(":", 1)[1], 16))] += 1
        except (OSError, ValueError, IndexError):
            continue
    return dict(found)


def as_event(ev):
    """Events travel as plain tuples in Event's field order (the readers
    make them in one C call); the slower paths name the fields."""
    return ev if isinstance(ev, Event) else Event._make(ev)



def safe_text(text):
    """Make text safe for a terminal: every non-printable character (ESC,
    newline, tab, other controls, bidi and zero-width marks) and the
    backslash itself become visible backslash escapes."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xff:
            out.append("\\x%02x" % ord(ch))
        elif 0xdc80 <= ord(ch) <= 0xdcff:
            # an undecodable byte, carried here by "surrogateescape"
            out.append("\\x%02x" % (ord(ch) - 0xdc00))
        elif ord(ch) <= 0xffff:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append("\\U%08x" % ord(ch))
    return "".join(out)


def _comm_text(raw):
    name = raw.split(b"\0", 1)[0]
    return safe_text(name.decode("utf-8", "surrogateescape"))


def comm_text(raw):
    """A kernel task name (NUL-padded bytes) as terminal-safe text. Invalid
    UTF-8 bytes show as \\xNN. Cached: a host has few distinct names."""
    return COMM_TEXTS[raw]


def address_text(family, raw):
    """An address from the event's 16-byte field, in its family's notation."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return "?"


def ip_version(family):
    return "4" if family == socket.AF_INET else "6" if family == socket.AF_INET6 else "?"


class Clock:
    """Turns the kernel's CLOCK_MONOTONIC event stamps into wall-clock time
    and into seconds since the first traced event."""

    def __init__(self):
        # Both clocks read back to back; the offset holds until the wall
        # clock is stepped (NTP), which a long run may see: good enough for
        # an HH:MM:SS column.
        self.wall_minus_mono = time.time_ns() - time.monotonic_ns()
        self.first_ns = None
        self._second = None
        self._hms = ""
        self._utc_second = None
        self._utc = ""

    def hms(self, ts_ns):
        second = (ts_ns + self.wall_minus_mono) // 1_000_000_000
        if second != self._second:
            self._second = second
            self._hms = time.strftime("%H:%M:%S", time.localtime(second))
        return self._hms

    def rfc3339(self, ts_ns):
        """The event's wall-clock time, RFC 3339 in UTC with microseconds."""
        wall_us = (ts_ns + self.wall_minus_mono) // 1000
        second, micro = divmod(wall_us, 1_000_000)
        if second != self._utc_second:
            self._utc_second = second
            self._utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return "%s.%06dZ" % (self._utc, micro)

    def since_first(self, ts_ns):
        if self.first_ns is None:
            self.first_ns = ts_ns
        return (ts_ns - self.first_ns) / 1e9


class CgroupCache:
    """The cgroup of a process, read from /proc/PID/cgroup and kept a few
    seconds per PID (a PID can be reused, a process can move). A process
    that has exited gives ""."""

    TTL_NS = 5_000_000_000
    LIMIT = 4096

    def __init__(self, proc="/proc"):
        self.proc = proc
        self._cache = {}

    def get(self, pid):
        now = time.monotonic_ns()
        hit = self._cache.get(pid)
        if hit is not None and hit[0] > now:
            return hit[1]
        if len(self._cache) >= self.LIMIT:
            self._cache.clear()
        value = safe_text(self.read(pid))
        self._cache[pid] = (now + self.TTL_NS, value)
        return value

    def read(self, pid):
        try:
            with open("%s/%d/cgroup" % (self.proc, pid), "rb") as f:
                lines = f.read().decode("utf-8", "surrogateescape").splitlines()
        except (OSError, ValueError):
            return ""
        return cgroup_path(lines)


def cgroup_path(lines):
    """The cgroup path from the lines of /proc/PID/cgroup: the unified (v2)
    hierarchy's, else systemd's named v1 hierarchy, else the first other v1
    hierarchy that says more than "/" (on hybrid systems the unified path
    is often just "/" while a v1 controller holds the container's path)."""
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.setdefault(parts[1], parts[2])
    ordered = [paths[k] for k in ("", "name=systemd") if k in paths]
    ordered += [v for k, v in paths.items() if k not in ("", "name=systemd")]
    for path in ordered:
        if path != "/":
            return path
    return ordered[0] if ordered else ""


class Formatter:
    """Turns Events into output text for the chosen mode (table, wide, CSV)."""

    def __init__(self, args, clock=None):
        self.args = args
        self.clock = clock or Clock()
        self.csv = args.csv
        self.json = args.json
        self.wide = args.wide
        self.extended = args.extended
        self.cgroups = CgroupCache()
        # Columns whose text a process chooses (names, cgroup): see
        # FORMULA_STARTS.
        self.csv_guard = ()
        if self.csv:
            self.csv_guard = tuple(i for i, t in enumerate(self.header_fields())
                                   if t in ("C-COMM", "O-COMM", "CGROUP"))
            self._rows = []
            self._writer = csv.writer(_ListWriter(self._rows),
                                      lineterminator="\n")
        else:
            convs = []
            if args.time:
                convs.append(TIME_COLUMN[1])
            if args.timestamp:
                convs.append(TIMESTAMP_COLUMN[1])
            for title, narrow, wide in TABLE_COLUMNS:
                conv = wide if self.wide else narrow
                if title == "MS" and self.extended:
                    conv = EXTENDED_MS
                if conv is not None:
                    convs.append(conv)
            if self.extended:
                convs.extend(conv for _title, conv in EXTENDED_COLUMNS)
            self._fmt = " ".join(convs) + "\n"
        self.row = self._fast_row()

    # -- the per-event fast path ---------------------------------------------
    def _fast_row(self):
        """A function event tuple -> output line, specialised for the mode:
        one %-format per event, with every text that repeats (addresses,
        names, states) taken from bounded caches. Same output as
        reference_row, a few times faster."""
        af_inet = socket.AF_INET
        a4 = _Cache(lambda raw: socket.inet_ntop(socket.AF_INET, raw[:4]))
        a6 = _Cache(lambda raw: socket.inet_ntop(socket.AF_INET6, raw))
        st = _Cache(state_name)
        clock, cgroups = self.clock, self.cgroups
        owner_known, span_known = OWNER_KNOWN, SPAN_KNOWN
        if self.json:
            cj = _Cache(lambda raw: _json_str(comm_text(raw)))
            rfc, since, fmt = clock.rfc3339, clock.since_first, JSON_LINE

            def json_row(ev):
                if ev[7] == af_inet:
                    la, ra, ip = a4[ev[11]], a4[ev[12]], 4
                else:
                    la, ra, ip = a6[ev[11]], a6[ev[12]], 6
                flags = ev[10]
                if flags & owner_known:
                    owner = (ev[4], cj[ev[14]], _json_str(cgroups.get(ev[4])))
                else:
                    owner = ("null", "null", "null")
                return fmt % ((rfc(ev[0]), since(ev[0]), ev[1], ip, la, ev[5], ra, ev[6],
                               st[ev[8]], st[ev[9]],
                               ev[2] if flags & span_known else "null", ev[3], cj[ev[13]])
                              + owner)
            return json_row

        if self.csv:
            cc = _Cache(lambda raw: csv_cell(comm_text(raw)))
            core = "%x,%d,%s,%s,%s,%d,%s,%d,%s,%s,%.3f"
            pre = ("%s," if self.args.time else "") + ("%.6f," if self.args.timestamp else "")
            post = ",%s,%s,%s" if self.extended else ""
            unknown_owner = (UNKNOWN, UNKNOWN, UNKNOWN)

            def owner(ev):
                if ev[10] & owner_known:
                    return (ev[4], cc[ev[14]], csv_cell(cgroups.get(ev[4])))
                return unknown_owner
        else:
            w = self.wide
            cc = COMM_TEXTS
            # The table's conversions, numeric where the value is a number;
            # "%.0s" takes the IP version and prints nothing (narrow mode).
            core = " ".join([
                "%-16x", "%-5d", "%-16.16s" if w else "%-10.10s",
                ("%-2s %-26s" if w else "%.0s%-15s"), "%-5d", "%-26s" if w else "%-15s",
                "%-5d", "%-11s -> %-11s", EXTENDED_MS.replace("s", ".3f") if self.extended
                else "%.3f"])
            pre = ("%-8s " if self.args.time else "") + ("%-9.6f " if self.args.timestamp else "")
            post = (" " + " ".join(conv for _t, conv in EXTENDED_COLUMNS)) if self.extended else ""
            unknown_owner = (UNKNOWN, UNKNOWN, UNKNOWN)

            def owner(ev):
                if ev[10] & owner_known:
                    return (ev[4], cc[ev[14]], cgroups.get(ev[4]))
                return unknown_owner
        fmt = pre + core + post + "\n"

        def fields(ev):
            if ev[7] == af_inet:
                la, ra, ip = a4[ev[11]], a4[ev[12]], "4"
            else:
                la, ra, ip = a6[ev[11]], a6[ev[12]], "6"
            return (ev[1], ev[3], cc[ev[13]], ip, la, ev[5], ra, ev[6],
                    st[ev[8]], st[ev[9]], ev[2] / 1000)

        if not (pre or post):
            # fields() inlined: the common case, one call less per event
            def plain_row(ev):
                if ev[7] == af_inet:
                    la, ra, ip = a4[ev[11]], a4[ev[12]], "4"
                else:
                    la, ra, ip = a6[ev[11]], a6[ev[12]], "6"
                return fmt % (ev[1], ev[3], cc[ev[13]], ip, la, ev[5], ra, ev[6],
                              st[ev[8]], st[ev[9]], ev[2] / 1000)
            return plain_row

        time_of, since_first = clock.hms, clock.since_first
        want_time, want_ts = self.args.time, self.args.timestamp

        def full_row(ev):
            head = ()
            if want_time:
                head = (time_of(ev[0]),)
            if want_ts:
                head += (since_first(ev[0]),)
            return fmt % (head + fields(ev) + (owner(ev) if post else ()))
        return full_row

    def header_fields(self):
        fields = []
        if self.args.time:
            fields.append(TIME_COLUMN[0])
        if self.args.timestamp:
            fields.append(TIMESTAMP_COLUMN[0])
        if self.csv:
            fields.extend(CSV_COLUMNS)
        else:
            for title, narrow, wide in TABLE_COLUMNS:
                if (wide if self.wide else narrow) is not None:
                    fields.append(title)
        if self.extended:
            fields.extend(title for title, _conv in EXTENDED_COLUMNS)
        return fields

    def header(self):
        if self.json:
            return ""
        fields = self.header_fields()
        if self.csv:
            return self._csv_line(fields)
        return self._fmt % tuple(fields)

    def row_fields(self, ev):
        ev = as_event(ev)
        fields = []
        if self.args.time:
            fields.append(self.clock.hms(ev.ts_ns))
        if self.args.timestamp:
            fields.append("%.6f" % self.clock.since_first(ev.ts_ns))
        fields.append("%x" % ev.skaddr)
        fields.append(str(ev.pid))
        fields.append(comm_text(ev.comm))
        if self.wide or self.csv:
            fields.append(ip_version(ev.family))
        fields.append(address_text(ev.family, ev.laddr))
        fields.append(str(ev.lport))
        fields.append(address_text(ev.family, ev.raddr))
        fields.append(str(ev.rport))
        fields.append(state_name(ev.oldstate))
        if not self.csv:
            fields.append("->")
        fields.append(state_name(ev.newstate))
        fields.append("%.3f" % (ev.span_us / 1000))
        if self.extended:
            if ev.flags & OWNER_KNOWN:
                fields.append(str(ev.opid))
                fields.append(comm_text(ev.ocomm))
                fields.append(self.cgroups.get(ev.opid))
            else:
                fields.extend((UNKNOWN, UNKNOWN, UNKNOWN))
        return fields

    def reference_row(self, ev):
        """One row, field by field: the plain statement of the format, which
        the fast row functions below must match (the tests check)."""
        if self.json:
            return self.reference_json_row(ev)
        fields = self.row_fields(ev)
        if self.csv:
            return self._csv_line(fields)
        return self._fmt % tuple(fields)

    def json_record(self, ev):
        """Every field the tool knows, as a dict for one JSON line."""
        ev = as_event(ev)
        owner = ev.flags & OWNER_KNOWN
        return {
            "time": self.clock.rfc3339(ev.ts_ns),
            "elapsed": round(self.clock.since_first(ev.ts_ns), 6),
            "skaddr": "%x" % ev.skaddr,
            "ip": 4 if ev.family == socket.AF_INET else 6,
            "laddr": address_text(ev.family, ev.laddr),
            "lport": ev.lport,
            "raddr": address_text(ev.family, ev.raddr),
            "rport": ev.rport,
            "oldstate": state_name(ev.oldstate),
            "newstate": state_name(ev.newstate),
            "span_us": ev.span_us if ev.flags & SPAN_KNOWN else None,
            "pid": ev.pid,
            "comm": comm_text(ev.comm),
            "owner_pid": ev.opid if owner else None,
            "owner_comm": comm_text(ev.ocomm) if owner else None,
            "owner_cgroup": self.cgroups.get(ev.opid) if owner else None,
        }

    def reference_json_row(self, ev):
        # By hand rather than json.dumps(json_record(ev)): a fixed key order,
        # "elapsed" always in fixed-point notation, and a fraction of the
        # cost. Only the texts a process controls need JSON escaping.
        ev = as_event(ev)
        owner = ev.flags & OWNER_KNOWN
        return JSON_LINE % (
            self.clock.rfc3339(ev.ts_ns), self.clock.since_first(ev.ts_ns),
            ev.skaddr, 4 if ev.family == socket.AF_INET else 6,
            address_text(ev.family, ev.laddr), ev.lport,
            address_text(ev.family, ev.raddr), ev.rport,
            state_name(ev.oldstate), state_name(ev.newstate),
            ev.span_us if ev.flags & SPAN_KNOWN else "null",
            ev.pid, _json_str(comm_text(ev.comm)),
            ev.opid if owner else "null",
            _json_str(comm_text(ev.ocomm)) if owner else "null",
            _json_str(self.cgroups.get(ev.opid)) if owner else "null")

    def _csv_line(self, fields):
        if self.csv_guard:
            for i in self.csv_guard:
                # "-" alone (an unknown owner) is no formula.
                if i < len(fields) and fields[i][:1] in FORMULA_STARTS and fields[i] != UNKNOWN:
                    fields[i] = "'" + fields[i]
        self._writer.writerow(fields)
        line = "".join(self._rows)
        self._rows.clear()
        return line


# A CSV cell starting with one of these is run as a formula by spreadsheet
# programs ("CSV injection"). A process chooses its own name, so in CSV a
# name (or cgroup) starting with one of them gets a leading apostrophe, as
# OWASP recommends; the table, JSON and the journal show names unchanged.
FORMULA_STARTS = frozenset("=+-@\t\r")

JSON_LINE = (
    '{"time":"%s","elapsed":%.6f,"skaddr":"%x","ip":%d,'
    '"laddr":"%s","lport":%d,"raddr":"%s","rport":%d,'
    '"oldstate":"%s","newstate":"%s","span_us":%s,"pid":%d,"comm":%s,'
    '"owner_pid":%s,"owner_comm":%s,"owner_cgroup":%s}\n')
_json_str = json.JSONEncoder(ensure_ascii=True).encode


class _Cache(dict):
    """A dict that computes missing values, and forgets everything when it
    reaches its limit (so it stays bounded on a host with many names)."""

    def __init__(self, compute, limit=4096):
        super().__init__()
        self.compute = compute
        self.limit = limit

    def __missing__(self, key):
        if len(self) >= self.limit:
            self.clear()
        value = self[key] = self.compute(key)
        return value


COMM_TEXTS = _Cache(_comm_text)


def csv_cell(text):
    """A text as one RFC 4180 cell, as the csv module would write it, with
    spreadsheet formulas defused (see FORMULA_STARTS)."""
    if text[:1] in FORMULA_STARTS and text != UNKNOWN:
        text = "'" + text
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


class _ListWriter:
    """A file-like sink for csv.writer that collects what it writes."""

    def __init__(self, target):
        self.write = target.append


# ---------------------------------------------------------------------------
# The systemd journal (-Y).
# ---------------------------------------------------------------------------
# Stable IDs: one for "a TCP socket changed state", one for "events were
# lost". systemd/tcpstates.catalog explains both to `journalctl -x`.
JOURNAL_MESSAGE_ID = "29e4d369fcd3401e89a1bc2b4ff01360"
JOURNAL_LOST_MESSAGE_ID = "8603391e3ee349579d0092a49adf604f"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_IDENTIFIER = "tcpstates"
LOG_NOTICE, LOG_WARNING = 5, 4


def endpoint_text(family, raw, port):
    address = address_text(family, raw)
    if family == socket.AF_INET6:
        return "[%s]:%d" % (address, port)
    return "%s:%d" % (address, port)


def journal_fields(ev, clock):
    """The journal record of one event, as an ordered dict of fields.

    Field names are the upstream bcc tool's where it has them, so existing
    queries keep working. OBJECT_PID is the socket's owner, set only when
    known, so that journald attaches the owner's name, executable and unit;
    the on-CPU task has fields of its own. No field starts with "_": those
    belong to journald."""
    v = "IPV4" if ev.family == socket.AF_INET else "IPV6"
    owner = ev.flags & OWNER_KNOWN
    span = ev.flags & SPAN_KNOWN
    who = ("%s[%d]" % (comm_text(ev.ocomm), ev.opid)) if owner else "unknown owner"
    fields = {
        "MESSAGE": "%s: %s \u2192 %s %s \u2192 %s%s" % (
            who, endpoint_text(ev.family, ev.laddr, ev.lport),
            endpoint_text(ev.family, ev.raddr, ev.rport),
            state_name(ev.oldstate), state_name(ev.newstate),
            (" after %.3f ms" % (ev.span_us / 1000)) if span else ""),
        "MESSAGE_ID": JOURNAL_MESSAGE_ID,
        "PRIORITY": str(LOG_NOTICE),
        "SYSLOG_IDENTIFIER": JOURNAL_IDENTIFIER,
    }
    if owner:
        fields["OBJECT_PID"] = str(ev.opid)
        fields["TCPSTATES_OWNER_COMM"] = comm_text(ev.ocomm)
    fields["OBJECT_%s_SOURCE_ADDRESS" % v] = address_text(ev.family, ev.laddr)
    fields["OBJECT_TCP_SOURCE_PORT"] = str(ev.lport)
    fields["OBJECT_%s_DESTINATION_ADDRESS" % v] = address_text(ev.family, ev.raddr)
    fields["OBJECT_TCP_DESTINATION_PORT"] = str(ev.rport)
    fields["OBJECT_TCP_OLD_STATE"] = state_name(ev.oldstate)
    fields["OBJECT_TCP_NEW_STATE"] = state_name(ev.newstate)
    if span:
        fields["OBJECT_TCP_SPAN_TIME"] = str(ev.span_us)
    fields["TCPSTATES_SOCKET"] = "%x" % ev.skaddr
    fields["TCPSTATES_IP_VERSION"] = ip_version(ev.family)
    fields["TCPSTATES_EVENT_REALTIME_USEC"] = str((ev.ts_ns + clock.wall_minus_mono) // 1000)
    fields["TCPSTATES_EVENT_MONOTONIC_USEC"] = str(ev.ts_ns // 1000)
    fields["TCPSTATES_ONCPU_PID"] = str(ev.pid)
    fields["TCPSTATES_ONCPU_COMM"] = comm_text(ev.comm)
    return fields


def lost_fields(lost, total):
    return {
        "MESSAGE": "tcpstates lost %d events (%d since start): the journal has a gap"
                   % (lost, total),
        "MESSAGE_ID": JOURNAL_LOST_MESSAGE_ID,
        "PRIORITY": str(LOG_WARNING),
        "SYSLOG_IDENTIFIER": JOURNAL_IDENTIFIER,
        "TCPSTATES_LOST": str(lost),
        "TCPSTATES_LOST_TOTAL": str(total),
    }


def import_journal_sender():
    try:
        from systemd import journal
    except ImportError:
        raise Fatal("-Y needs python-systemd; install python3-systemd and run "
                    "tcpstates with /usr/bin/python3") from None
    return journal.sendv


def check_journald(path=JOURNAL_SOCKET):
    """journald must be listening before anything is attached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(path)
    except OSError:
        raise Fatal("-Y: journald is not running (nothing listens on %s); start "
                    "systemd-journald, or run without -Y" % path) from None
    finally:
        sock.close()


class JournalWriter:
    """Sends records through sender (python-systemd's sendv by default;
    tests pass their own). If journald goes away mid-run the tracer keeps
    going: the first failure is reported on stderr, the rest are counted."""

    def __init__(self, clock, sender, warn):
        self.clock = clock
        self.sender = sender
        self.warn = warn
        self.unsent = 0

    def _send(self, fields):
        try:
            self.sender(*["%s=%s" % item for item in fields.items()])
        except OSError as exc:
            if not self.unsent:
                self.warn("journal: sending a record failed (%s); tracing goes on, "
                          "unsent records are counted" % (exc.strerror or exc))
            self.unsent += 1

    def event(self, ev):
        self._send(journal_fields(as_event(ev), self.clock))

    def lost(self, lost, total):
        self._send(lost_fields(lost, total))


# ---------------------------------------------------------------------------
# Checks before any compile work: each failure gets its own message.
# ---------------------------------------------------------------------------
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def effective_caps():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges():
    """What the tool really needs: CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN
    on kernels before 5.8), as root (uid 0 owns tracefs, which BCC reads).
    Checked before any compile work."""
    caps = effective_caps()
    has = lambda cap: bool(caps & (1 << cap))
    enough = has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))
    if os.geteuid() != 0:
        raise Fatal("loading a BPF program needs root (CAP_BPF and CAP_PERFMON, "
                    "or CAP_SYS_ADMIN); run it with sudo")
    if not enough:
        raise Fatal("running as root but without CAP_BPF and CAP_PERFMON (or "
                    "CAP_SYS_ADMIN), which loading a BPF program needs; allow them "
                    "in the capability bounding set (CapabilityBoundingSet=)")


def find_tracefs():
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def tracepoint_exists(name):
    tracefs = find_tracefs()
    return tracefs is not None and os.path.isdir(
        os.path.join(tracefs, "events", *name.split(":")))


def check_tracepoint():
    tracefs = find_tracefs()
    if tracefs is None:
        raise Fatal("tracefs is not mounted; mount it with: "
                    "mount -t tracefs tracefs /sys/kernel/tracing")
    category, event = TRACEPOINT.split(":")
    if not os.path.isdir(os.path.join(tracefs, "events", category, event)):
        raise Fatal("this kernel has no %s tracepoint (it needs Linux 4.16 or "
                    "later); tcpstates has no kprobe fallback" % TRACEPOINT)


def check_kernel_headers():
    release = os.uname().release
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return
    moddir = "/lib/modules/%s" % release
    if os.path.isdir(os.path.join(moddir, "build")) or \
            os.path.isdir(os.path.join(moddir, "source")):
        return
    raise Fatal("no kernel headers at %s/build; install linux-headers-%s "
                "(or run setup.sh, which wires in generic headers when the "
                "distribution has none for this kernel)" % (moddir, release))


def import_bcc():
    try:
        import bcc
    except ImportError:
        raise Fatal("BCC's Python bindings are missing; install python3-bpfcc "
                    "and run tcpstates with /usr/bin/python3") from None
    return bcc


class _StderrCapture:
    """Sends fd 2 to a memory file while BCC compiles, so that clang's
    diagnostics and "modprobe: not found" never reach the user raw."""

    def __enter__(self):
        sys.stderr.flush()
        # An anonymous memory file: no writable file system needed (the
        # service runs with a read-only one).
        self.file = os.fdopen(os.memfd_create("tcpstates-compile"), "w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return False

    def first_error(self):
        for line in self.text.splitlines():
            if "error" in line.lower():
                return line.strip()[:200]
        lines = [l for l in self.text.splitlines() if l.strip()]
        return lines[-1].strip()[:200] if lines else ""


# ---------------------------------------------------------------------------
# The runtime: reading the perf buffers.
# ---------------------------------------------------------------------------
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_OPEN = {"x86_64": 298}       # syscall numbers (see PerfRings)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# A sample record as the kernel writes it for one struct event: an 8-byte
# header (type, misc, size), the u32 raw size, the event, padding to 8.
SAMPLE_SIZE = (8 + 4 + EVENT_STRUCT.size + 7) // 8 * 8
SAMPLE_STRUCT = struct.Struct("<12x" + EVENT_STRUCT.format.lstrip("<") +
                              "%dx" % (SAMPLE_SIZE - 12 - EVENT_STRUCT.size))
_HEADER = struct.Struct("<IHH")
_U64 = struct.Struct("<Q")


def parse_records(chunk, sink):
    """Decode a run of perf records: events are appended to sink (a list);
    returns the number of lost events the kernel reported among them.

    Nearly always the run holds only samples of one size, and all of them
    are decoded by one C call (iter_unpack); the header bytes of every
    record are checked first, by slicing at that stride."""
    n, rest = divmod(len(chunk), SAMPLE_SIZE)
    if not rest and n and chunk[0::SAMPLE_SIZE].count(PERF_RECORD_SAMPLE) == n \
            and chunk[6::SAMPLE_SIZE].count(SAMPLE_SIZE) == n \
            and not chunk[1::SAMPLE_SIZE].strip(b"\0") and not chunk[7::SAMPLE_SIZE].strip(b"\0"):
        sink.extend(SAMPLE_STRUCT.iter_unpack(chunk))
        return 0
    lost = 0
    offset, end = 0, len(chunk)
    unpack_header = _HEADER.unpack_from
    while offset + 8 <= end:
        rtype, _misc, size = unpack_header(chunk, offset)
        if size < 8:
            break                      # corrupt: never loop forever
        if rtype == PERF_RECORD_SAMPLE and size >= 12 + EVENT_STRUCT.size:
            sink.append(EVENT_STRUCT.unpack_from(chunk, offset + 12))
        elif rtype == PERF_RECORD_LOST and size >= 24:
            lost += _U64.unpack_from(chunk, offset + 16)[0]
        offset += size
    return lost


class PerfRings:
    """The per-CPU perf ring buffers of a BPF_PERF_OUTPUT map, opened and
    read here, through mmap, instead of through BCC's reader.

    BCC's reader calls back into Python once per event through ctypes (two
    Python calls and a copy each). Here a poll reads whole runs of records
    from each ring and decodes them in one C call, which is most of the
    difference at tens of thousands of events a second. Readers wake up
    once per `wakeup` events per CPU; the caller polls with a timeout and
    then reads every ring, so a lone event waits at most that long.

    x86_64 only (its stores are seen in order, so reading data_head then the
    data needs no barrier that Python cannot give); elsewhere tcpstates uses
    BCC's reader."""

    def __init__(self, table, cpus, pages, wakeup):
        import mmap
        import select
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._ioctl = libc.ioctl
        self.rings = []
        self.epoll = select.epoll()
        try:
            for cpu in cpus:
                fd = self._open(cpu, wakeup)
                try:
                    ring = mmap.mmap(fd, (pages + 1) * PAGE_SIZE, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError:
                    os.close(fd)
                    raise
                self.rings.append((fd, ring, pages * PAGE_SIZE))
                if self._ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) != 0:
                    raise OSError(ctypes.get_errno(), "PERF_EVENT_IOC_ENABLE failed")
                table[ctypes.c_int(cpu)] = ctypes.c_int(fd)
                self.epoll.register(fd, select.EPOLLIN)
        except Exception:
            self.close()
            raise

    def _open(self, cpu, wakeup):
        attr = ctypes.create_string_buffer(112)            # PERF_ATTR_SIZE_VER5
        struct.pack_into("<IIQQQ", attr, 0, PERF_TYPE_SOFTWARE, 112,
                         PERF_COUNT_SW_BPF_OUTPUT, 1, PERF_SAMPLE_RAW)
        struct.pack_into("<I", attr, 48, wakeup)            # wakeup_events
        fd = self._syscall(PERF_EVENT_OPEN[os.uname().machine], attr, -1, cpu, -1,
                           PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "perf_event_open on CPU %d: %s" % (cpu, os.strerror(err)))
        return fd

    def poll(self, timeout_ms):
        self.epoll.poll(timeout_ms / 1000)

    def consume(self, sink):
        """Read every ring to its end; events go to sink. Returns lost."""
        lost = 0
        unpack = _U64.unpack_from
        for _fd, ring, size in self.rings:
            head = unpack(ring, 1024)[0]                    # data_head
            tail = unpack(ring, 1032)[0]                    # data_tail
            if head == tail:
                continue
            start = PAGE_SIZE + tail % size
            length = head - tail
            if start + length <= PAGE_SIZE + size:
                chunk = ring[start:start + length]
            else:
                first = PAGE_SIZE + size - start
                chunk = ring[start:PAGE_SIZE + size] + ring[PAGE_SIZE:PAGE_SIZE + length - first]
            lost += parse_records(chunk, sink)
            _U64.pack_into(ring, 1032, head)                # data_tail: space is free
        return lost

    def close(self):
        self.epoll.close()
        for fd, ring, _size in self.rings:
            ring.close()
            os.close(fd)
        self.rings = []


class BccRings:
    """The same interface over BCC's own reader, for other architectures."""

    def __init__(self, bpf, table, pages, wakeup):
        self.bpf = bpf
        self.pending = []
        self.lost = 0
        self.failure = None
        table.open_perf_buffer(self._on_event, page_cnt=pages, lost_cb=self._on_lost,
                               wakeup_events=wakeup)

    def _on_event(self, cpu, data, size):
        # An exception here would be printed and ignored by ctypes: it is
        # kept, and raised by consume().
        try:
            self.pending.append(EVENT_STRUCT.unpack_from(ctypes.string_at(data, size)))
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc

    def _on_lost(self, count):
        self.lost += count

    def poll(self, timeout_ms):
        self.bpf.perf_buffer_poll(timeout_ms)

    def consume(self, sink):
        self.bpf.perf_buffer_consume()
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        sink.extend(self.pending)
        self.pending = []
        lost, self.lost = self.lost, 0
        return lost

    def close(self):
        pass


class Reorderer:
    """Holds events back until no earlier one can still arrive, then gives
    them out in kernel-timestamp order.

    Per-CPU perf buffers are read one CPU after another, so a batch can hold
    a later event from one CPU before an earlier one from another. The loop
    takes a horizon (the monotonic clock, less a margin for a BPF program
    between its timestamp and its perf_submit) and then reads every buffer
    to the end: everything stamped before the horizon has then been read,
    and can leave in order. An event is held at most one poll interval plus
    the margin."""

    def __init__(self):
        self._pending = []

    def add(self, event):
        self._pending.append(event)

    @property
    def sink(self):
        """The list that readers append new events to."""
        return self._pending

    def __len__(self):
        return len(self._pending)

    def release(self, horizon=None):
        """The events stamped at or before horizon (all if None), sorted."""
        pending = self._pending
        if not pending:
            return []
        pending.sort(key=_ts_key)
        if horizon is None or pending[-1][0] <= horizon:
            self._pending = []
            return pending
        cut = bisect.bisect_right(pending, horizon, key=_ts_key)
        ready, self._pending = pending[:cut], pending[cut:]
        return ready


class Tracer:
    """Compiles the program, fills its maps, attaches it, and moves events
    from the perf buffers to the output in kernel-timestamp order."""

    def __init__(self, args, out, journal_sender=None):
        self.args = args
        self.out = out
        self.formatter = Formatter(args)
        self.reorder = Reorderer()
        self.writing = False
        self.rings = None
        self.journal = None
        if journal_sender is not None:
            self.journal = JournalWriter(self.formatter.clock, journal_sender, _error)
        # A service discards stdout (its records go to the journal): then
        # rows are not even formatted.
        self.write_rows = not _is_devnull(out)
        self.lost = 0
        self.lost_reported = 0
        self.lost_report_ns = 0
        self.skipped = 0
        self.skipped_reported = 0
        self.skipped_known = False
        self.prog_fd = None
        self.printed = 0
        self.stop_signal = None
        self.bpf = None

    # -- set-up ------------------------------------------------------------
    def load(self):
        bcc = import_bcc()

        class _BPF(bcc.BPF):
            # BCC attaches TRACEPOINT_PROBE functions inside its constructor;
            # tcpstates attaches by hand once the port maps are filled, so
            # that no event is ever judged against an empty filter.
            def _trace_autoload(self):
                pass

        cflags = bpf_cflags(self.args)
        with _StderrCapture() as capture:
            try:
                self.bpf = _BPF(text=BPF_PROGRAM.encode(), cflags=cflags)
            except Exception:
                self.bpf = None
        if self.bpf is None:
            detail = capture.first_error()
            raise Fatal("compiling the BPF program failed%s; check that the "
                        "kernel headers match (see setup.sh)"
                        % (": " + detail if detail else ""))
        try:
            # Everything the program reads or writes is in place before it
            # is attached: the maps filled, and the perf rings open (an event
            # submitted to a CPU without one would vanish uncounted).
            self._seed_listeners()
            self._fill_port_map("local_ports", self.args.localport)
            self._fill_port_map("remote_ports", self.args.remoteport)
            table = self.bpf[b"events"]
            if os.uname().machine in PERF_EVENT_OPEN:
                from bcc.utils import get_online_cpus
                self.rings = PerfRings(table, get_online_cpus(), self.args.perf_pages,
                                       WAKEUP_EVENTS)
            else:
                self.rings = BccRings(self.bpf, table, self.args.perf_pages, WAKEUP_EVENTS)
            fn = self.bpf.load_func(b"tracepoint__sock__inet_sock_set_state",
                                    bcc.BPF.TRACEPOINT)
            self.prog_fd = fn.fd
            self.skipped_known = prog_recursion_misses(fn.fd) is not None
            self.bpf.attach_tracepoint(tp=TRACEPOINT.encode(), fn_name=fn.name)
            if DESTROY_HOOK_FLAG in cflags:
                fn = self.bpf.load_func(b"tracepoint__tcp__tcp_destroy_sock",
                                        bcc.BPF.TRACEPOINT)
                self.bpf.attach_tracepoint(tp=DESTROY_TRACEPOINT.encode(), fn_name=fn.name)
        except Exception as exc:
            self.close()
            raise Fatal("loading or attaching the BPF program failed: %s"
                        % (str(exc).splitlines() or ["unknown error"])[0]) from None

    def _fill_port_map(self, name, ports):
        if not ports:
            return
        table = self.bpf[name.encode()]
        for index, word in enumerate(port_bitmap(ports)):
            if word:
                table[table.Key(index)] = table.Leaf(word)

    def _seed_listeners(self):
        # Listeners that predate the tracer have unknown owners: say so in
        # the map, so that a new listener on the same port (another network
        # namespace, or SO_REUSEPORT) makes the port ambiguous, not wrong.
        table = self.bpf[b"listeners"]
        for (family, port), count in existing_listeners().items():
            leaf = table.Leaf()
            leaf.opid = 0
            leaf.count = count
            table[table.Key((family << 16) | port)] = leaf

    def close(self):
        if self.rings is not None:
            rings, self.rings = self.rings, None
            rings.close()
        if self.bpf is not None:
            bpf, self.bpf = self.bpf, None
            bpf.cleanup()

    # -- the loop --------------------------------------------------------
    def run(self):
        self._write(self.formatter.header())
        poll = self.rings.poll
        clock = time.monotonic_ns
        deadline = None
        if self.args.duration is not None:
            deadline = clock() + int(self.args.duration * 1e9)
        while self.stop_signal is None and not self.done:
            timeout = POLL_TIMEOUT_MS
            if deadline is not None:
                left = deadline - clock()
                if left <= 0:
                    break
                timeout = max(1, min(timeout, left // 1_000_000))
            poll(timeout)
            # See Reorderer: the horizon is taken before the buffers are
            # read to the end.
            horizon = clock() - REORDER_MARGIN_NS
            self._consume()
            self._drain(horizon)
            self.report_lost()
        if not self.done:
            self._consume()
            self._drain(None)
        self.report_lost(final=True)

    @property
    def done(self):
        count = self.args.count
        return count is not None and self.printed >= count

    def _consume(self):
        try:
            self.lost += self.rings.consume(self.reorder.sink)
        except (Fatal, StoppedWhileWriting):
            raise
        except Exception as exc:
            raise Fatal("reading an event failed: %s: %s"
                        % (type(exc).__name__, exc)) from None

    def _drain(self, horizon):
        ready = self.reorder.release(horizon)
        if not ready:
            return
        if self.args.count is not None:
            ready = ready[:self.args.count - self.printed]
        if self.write_rows:
            row = self.formatter.row
            self._write("".join([row(ev) for ev in ready]))
        self.printed += len(ready)
        if self.journal is not None:
            send = self.journal.event
            for ev in ready:
                send(ev)

    def report_lost(self, final=False):
        """Losses, as they happen: at most one stderr line (and with -Y one
        journal record) a second, with the running totals. Two kinds: events
        the perf buffers had no room for, and tracepoint hits the kernel
        skipped because another BPF program was running on that CPU (the
        program's recursion_misses)."""
        now = time.monotonic_ns()
        if not final and now - self.lost_report_ns < 1_000_000_000:
            return
        self.lost_report_ns = now
        skipped = prog_recursion_misses(self.prog_fd)
        if skipped is not None:
            self.skipped = skipped
        new_lost = self.lost - self.lost_reported
        new_skipped = self.skipped - self.skipped_reported
        if not (new_lost or new_skipped):
            return
        self.lost_reported, self.skipped_reported = self.lost, self.skipped
        parts = []
        if new_lost:
            parts.append("lost %d events (%d in all): perf buffers overflowed"
                         % (new_lost, self.lost))
        if new_skipped:
            parts.append("the kernel skipped %d events (%d in all): another BPF "
                         "program was running on the CPU" % (new_skipped, self.skipped))
        _error("; ".join(parts))
        if self.journal is not None:
            self.journal.lost(new_lost + new_skipped, self.lost + self.skipped)

    def _write(self, text):
        # A stop signal that finds us blocked here (the reader of our output
        # stopped reading) aborts the write: see request_stop.
        self.writing = True
        try:
            self.out.write(text)
            self.out.flush()
        finally:
            self.writing = False

    def summary(self):
        text = "summary: %d printed, %d lost" % (self.printed, self.lost)
        if self.skipped_known:
            text += ", %d skipped by the kernel" % self.skipped
        if self.journal is not None:
            text += ", %d journal records not sent" % self.journal.unsent
        return text

    def request_stop(self, signum, _frame=None):
        # Normally the loop sees the flag within one poll interval, after
        # writing out what it has read. A write in progress is given
        # WRITE_GRACE_S to finish; one still blocked then (the reader of our
        # output stopped reading) is aborted by the alarm.
        self.stop_signal = signum
        if self.writing:
            signal.signal(signal.SIGALRM, self._write_stuck)
            signal.setitimer(signal.ITIMER_REAL, WRITE_GRACE_S)

    def _write_stuck(self, _signum, _frame=None):
        if self.writing:
            raise StoppedWhileWriting()


# struct bpf_prog_info (include/uapi/linux/bpf.h): recursion_misses is the
# u64 at offset 208 (Linux 5.12 and later); the kernel says how much of the
# struct it filled.
PROG_INFO_SIZE = 256
PROG_INFO_RECURSION_MISSES = 208


def prog_recursion_misses(fd):
    """The kernel's count of times it skipped this program, or None where
    the kernel does not report it."""
    if fd is None:
        return None
    try:
        from bcc.libbcc import lib
        get_info = lib.bpf_obj_get_info
    except (ImportError, AttributeError):
        return None
    get_info.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    buf = ctypes.create_string_buffer(PROG_INFO_SIZE)
    size = ctypes.c_uint32(PROG_INFO_SIZE)
    if get_info(fd, buf, ctypes.byref(size)) != 0:
        return None
    return parse_recursion_misses(buf.raw, size.value)


def parse_recursion_misses(raw, filled):
    end = PROG_INFO_RECURSION_MISSES + 8
    if filled < end:
        return None
    return struct.unpack_from("<Q", raw, PROG_INFO_RECURSION_MISSES)[0]


def _is_devnull(stream):
    try:
        st = os.fstat(stream.fileno())
        null = os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_rdev, st.st_ino) == (null.st_rdev, null.st_ino)


_ts_key = operator.itemgetter(0)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------
EXAMPLES = """examples:
    tcpstates               # trace all TCP state changes
    tcpstates -t            # add seconds since the first event
    tcpstates -T            # add the event's time of day (HH:MM:SS)
    tcpstates -w            # wide columns, fit IPv6 addresses
    tcpstates -stT          # CSV, with time of day and seconds
    tcpstates -L 80         # only local port 80
    tcpstates -L 80,443     # only local ports 80 and 443
    tcpstates -D 5432       # only remote port 5432
    tcpstates -4            # IPv4 only
    tcpstates -6            # IPv6 only
    tcpstates -x            # add each socket's owner (PID, name, cgroup)
    tcpstates -p 181        # only sockets owned by PID 181
    tcpstates -Y            # also record each event in the systemd journal
    tcpstates -j            # JSON lines, for jq and log shippers
    tcpstates --from SYN_SENT --to CLOSE    # failed connects
    tcpstates --min-span 1000               # states that lasted 1 s or more
    tcpstates -j --duration 60 --count 1000 # bounded run
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # The message can quote the user's argument: keep it one safe line.
        raise UsageError(safe_text(message))


def build_parser():
    parser = _Parser(
        prog=PROG,
        description="Trace TCP state changes and the time spent in each state",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES)
    parser.add_argument("-T", "--time", action="store_true",
                        help="include a time column (HH:MM:SS, the event's time)")
    parser.add_argument("-t", "--timestamp", action="store_true",
                        help="include seconds since the first traced event")
    parser.add_argument("-w", "--wide", action="store_true",
                        help="wide columns (fit IPv6 addresses), with an IP column")
    parser.add_argument("-s", "--csv", action="store_true",
                        help="comma-separated values, with a header row")
    parser.add_argument("-L", "--localport", type=port_list, metavar="PORTS",
                        help="only these local ports (comma-separated)")
    parser.add_argument("-D", "--remoteport", type=port_list, metavar="PORTS",
                        help="only these remote ports (comma-separated)")
    parser.add_argument("-x", "--extended", action="store_true",
                        help="add the socket's owner: O-PID, O-COMM, CGROUP")
    parser.add_argument("-p", "--pid", type=pid_arg, metavar="PID",
                        help="only sockets owned by this process")
    parser.add_argument("-Y", "--journal", action="store_true",
                        help="also send each event to the systemd journal")
    parser.add_argument("-j", "--json", action="store_true",
                        help="one JSON object per line, with every field")
    parser.add_argument("--from", dest="from_states", type=state_list, metavar="STATES",
                        help="only transitions out of these states (e.g. SYN_SENT)")
    parser.add_argument("--to", dest="to_states", type=state_list, metavar="STATES",
                        help="only transitions into these states (e.g. CLOSE)")
    parser.add_argument("--min-span", type=milliseconds, metavar="MS",
                        help="only transitions whose previous state lasted at least MS ms")
    parser.add_argument("--duration", type=seconds, metavar="SECONDS",
                        help="stop after SECONDS seconds")
    parser.add_argument("--count", type=event_count, metavar="N",
                        help="stop after N events")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4", action="store_true",
                        help="trace IPv4 only")
    family.add_argument("-6", "--ipv6", action="store_true",
                        help="trace IPv6 only")
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--perf-pages", type=_perf_pages,
                        default=DEFAULT_PERF_PAGES, help=argparse.SUPPRESS)
    # Size of the per-socket map: a test knob, to overflow it on purpose.
    parser.add_argument("--max-sockets", type=_max_sockets, help=argparse.SUPPRESS)
    return parser


def _positive_number(text, what, integer=False):
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = -1
    if not (value > 0 and value < 1e9):
        raise argparse.ArgumentTypeError(
            "invalid %s %r: a positive number%s" % (
                what, text, " (whole)" if integer else ""))
    return value


def milliseconds(text):
    return _positive_number(text, "span")


def seconds(text):
    return _positive_number(text, "duration")


def event_count(text):
    return _positive_number(text, "count", integer=True)


def pid_arg(text):
    """A process ID for -p: a number from 1 to 4194304 (the kernel's limit)."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 4194304:
        raise argparse.ArgumentTypeError(
            "invalid PID %r: a process ID is a number from 1 to 4194304" % text)
    return int(text)


def _max_sockets(text):
    if not (text.isascii() and text.isdigit()) or not 64 <= int(text) <= 1 << 24:
        raise argparse.ArgumentTypeError("invalid map size %r: 64 to 16777216" % text)
    return int(text)


def _perf_pages(text):
    try:
        pages = int(text)
    except ValueError:
        pages = 0
    if pages < 1 or pages & (pages - 1) or pages > 65536:
        raise argparse.ArgumentTypeError(
            "invalid page count %r: a power of two from 1 to 65536" % text)
    return pages


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.csv:
        parser.error("argument -j/--json: not allowed with argument -s/--csv")
    return args


def _error(message):
    sys.stderr.write("%s: %s\n" % (PROG, message))
    sys.stderr.flush()


def _quiet_stdout():
    # After a broken pipe, point fd 1 at /dev/null so that the interpreter's
    # final flush cannot raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv=None):
    try:
        args = parse_args(argv)
    except UsageError as exc:
        _error("%s (see --help)" % exc)
        return 2
    if args.ebpf:
        try:
            sys.stdout.write(ebpf_listing(args))
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
        return 0

    if hasattr(sys.stdout, "reconfigure"):
        # Names are escaped already; this only keeps a non-UTF-8 locale from
        # failing on a printable non-ASCII character.
        sys.stdout.reconfigure(errors="backslashreplace")
    tracer = None
    try:
        check_privileges()
        check_tracepoint()
        check_kernel_headers()
        sender = None
        if args.journal:
            sender = import_journal_sender()
            check_journald()
        tracer = Tracer(args, sys.stdout, sender)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, tracer.request_stop)
        # A shell starts background jobs with SIGINT ignored; keep it so.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, tracer.request_stop)
        tracer.load()
        tracer.run()
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except StoppedWhileWriting:
        # What could not be written cannot be; do not block again at exit.
        _quiet_stdout()
    except KeyboardInterrupt:
        return 0
    except Fatal as exc:
        _error(str(exc))
        return 1
    except Exception as exc:      # a bug: still one line, and a clean detach
        _error("internal error: %s: %s" % (type(exc).__name__, exc))
        return 1
    finally:
        if tracer is not None:
            tracer.close()
    _error(tracer.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
