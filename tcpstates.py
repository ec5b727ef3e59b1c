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

The module is importable without BCC or root: ``bcc`` and ``systemd`` are
imported only inside the functions that need them, so the argument parsing,
decoding and formatting below can be tested anywhere. Run it as root with
Debian's /usr/bin/python3 (which sees python3-bpfcc).

Where things are, top to bottom (each section under a banner):
  1. Constants     TCP states, COLUMNS (the one column table), the event
                   layout shared with the C program, tunables, kernel ABI
                   numbers, journal IDs, the exceptions.
  2. BPF program   BPF_PROGRAM, the C text; configured by -D defines.
  3. Text helpers  close reasons (decide_reason, Reasons), state names,
                   safe_text, addresses, process names, Clock, ProcessCache
                   (what /proc says of an owner).
  4. Output        Formatter (table, wide, CSV, JSON rows from COLUMNS),
                   StuckFormatter (--stuck rows), LifeFormatter (--lifecycle
                   rows), journal records, JournalSocket (journald's
                   native protocol), JournalWriter (the sender thread);
                   then, bannered, the metrics for Prometheus: Metrics
                   (transitions and durations from the BPF program's
                   metric_counts map, or counted per batch from
                   Tracer._drain; connect results per batch; loss from
                   Tracer.read_counters) and
                   MetricsExporter (--metrics HTTP, --metrics-file).
  5. Kernel        checks before compiling, probe_kernel, bpf_cflags (pure),
                   existing listeners, the program without the compiler
                   (compile_program, Program, ProgramCache, load_program),
                   perf rings (PerfRings, BccRings).
  6. Runtime       StopRequest, Sink (writes that never hang), Reorderer,
                   Ledger (every loss counter), StuckWatch (--stuck),
                   Lifecycles (--lifecycle), Tracer (orchestration).
  7. Command line  argument types, build_parser, main.

To add an output column: an entry in COLUMNS, its value in
Formatter._fast_row (and in tests/helpers.py's reference_fields). A kernel filter: a -D define
in bpf_cflags, its test in the C program's in_view() or probe, an option in
build_parser. A loss counter: an index in the C program's counters array,
its reading in Tracer.read_counters, a field in Ledger, its word in
Tracer.summary and in the man page's LOSS ACCOUNTING (and a cause in
LOSS_CAUSES, set in Tracer.read_counters). A metric: its count in
Metrics._fold (and, if the kernel counts it, in the C program's
count_metrics and metric_counts), its family in Metrics.families, an entry
in the man page's METRICS. A reason: a word in
REASONS, its rule in decide_reason (and the man page's REASONS); a fact
from another tracepoint: a hook in REASON_HOOKS, its C function behind
its HAVE_ define, a KernelFacts field probed in probe_kernel.
"""

import argparse
import base64
import bisect
import collections
import ctypes
import json
import operator
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time


# ---------------------------------------------------------------------------
# 1. Constants: states, columns, the event layout, tunables, kernel ABI numbers.
# ---------------------------------------------------------------------------
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
TCP_LISTEN = 10

# Other spellings accepted on the command line: ss(8)'s names (ESTAB,
# SYN-SENT, FIN-WAIT-1, UNCONN, ...), and dashes for underscores.
STATE_ALIASES = {
    "ESTAB": 1, "SYN_RECEIVED": 3, "FIN_WAIT_1": 4, "FIN_WAIT_2": 5,
    "CLOSED": 7, "UNCONN": 7, "SYN_RCVD": 3,
}

# Columns of the table and of CSV, in the upstream bcc tool's order and with
# its titles, so that scripts keep working. Each entry: (title, conversion in
# the table, in the wide table (-w), in CSV); None where the mode does not
# show the column. A conversion formats the row's value; the header is the
# same conversion with the type made "s" (the width kept), so the two cannot
# drift. TIME and TIME(s) come first with -T and -t; REASON and the owner
# columns last with -x (REASON also with --reason; MS then gets a width, so
# that they line up).
COLUMNS = (
    ("TIME", "%-8s", "%-8s", "%s"),
    ("TIME(s)", "%-9.6f", "%-9.6f", "%.6f"),
    ("SKADDR", "%-16x", "%-16x", "%x"),
    ("C-PID", "%-5d", "%-5d", "%d"),
    ("C-COMM", "%-10.10s", "%-16.16s", "%s"),
    ("IP", None, "%-2s", "%s"),
    ("LADDR", "%-15s", "%-26s", "%s"),
    ("LPORT", "%-5d", "%-5d", "%d"),
    ("RADDR", "%-15s", "%-26s", "%s"),
    ("RPORT", "%-5d", "%-5d", "%d"),
    ("OLDSTATE", "%-11s", "%-11s", "%s"),
    ("->", "%s", "%s", None),
    ("NEWSTATE", "%-11s", "%-11s", "%s"),
    ("MS", "%.3f", "%.3f", "%.3f"),
    ("REASON", "%-20s", "%-20s", "%s"),
    ("O-PID", "%-7s", "%-7s", "%s"),
    ("O-COMM", "%-16.16s", "%-16.16s", "%s"),
    ("O-FROM", "%-8s", "%-8s", "%s"),
    ("CGROUP", "%s", "%s", "%s"),
)
TIME_TITLES = ("TIME", "TIME(s)")
OWNER_TITLES = ("O-PID", "O-COMM", "O-FROM", "CGROUP")
REASON_TITLE = "REASON"
EXTENDED_MS = "%-10.3f"
UNKNOWN = "-"

# How an owner was learned (O-FROM, "owner_from", TCPSTATES_OWNER_FROM):
# "self", from one of the socket's own system calls; "listener", inherited
# by an accepted socket from the process that called listen().
OWNER_SELF, OWNER_LISTENER = "self", "listener"

# A CSV cell starting with one of these is run as a formula by spreadsheet
# programs ("CSV injection"). A process chooses its own name, so in CSV a
# name (or cgroup) starting with one of them gets a leading apostrophe, as
# OWASP recommends; the table, JSON and the journal show names unchanged.
FORMULA_STARTS = frozenset("=+-@\t\r")

# One JSON object per line, by hand rather than json.dumps: a fixed key
# order, "elapsed" always in fixed-point notation, and a fraction of the
# cost. Only the texts a process controls need JSON escaping.
# The owner's and the reason's keys are formatted once per distinct value
# (see Formatter._json_row), and go into the line as one piece each.
JSON_OWNER = '"owner_pid":%s,"owner_comm":%s,"owner_from":%s,"owner_cgroup":%s'
JSON_REASON = '"reason":%s,"errno":%s,"retries":%s,"reset_reason":%s'
JSON_LINE = (
    '{"time":"%s","elapsed":%.6f,"skaddr":"%x","ip":%d,'
    '"laddr":"%s","lport":%d,"raddr":"%s","rport":%d,'
    '"oldstate":"%s","newstate":"%s","span_us":%s,"pid":%d,"comm":%s,'
    + JSON_OWNER + ',' + JSON_REASON + '}\n')

# struct event, as the BPF program below lays it out (little-endian, no
# implicit padding).
EVENT_STRUCT = struct.Struct("<QQQIIHHHHHH16s16s16s16s4xQHHHH")
SPAN_KNOWN = 1          # event.flags, as in the C program
OWNER_KNOWN = 2
OWNER_INHERITED = 4
AMEND = 8               # not an event: more facts for the CLOSE row it names
R_RST_RECEIVED = 1      # event.rflags: what the kernel said of a socket's end
R_RST_SENT = 2
R_RST_REASON = 4        # rst_reason holds the kernel's reason for the reset
R_ERRNO = 8             # error holds the errno the kernel reported
R_RETRIES = 16          # retries holds the retransmissions in the state left
Event = collections.namedtuple("Event", (
    "ts_ns", "skaddr", "span_us", "pid", "opid", "lport", "rport", "family",
    "oldstate", "newstate", "flags", "laddr", "raddr", "comm", "ocomm", "osince",
    "rflags", "rst_reason", "error", "retries"), defaults=(0, 0, 0, 0))
# Where event.flags sits in a perf sample record (its low byte): the readers
# look there for amendments without decoding every record in Python.
FLAGS_IN_SAMPLE = 12 + struct.calcsize("<QQQIIHHHHH")
NOT_AMEND_BYTES = bytes(b for b in range(256) if not b & AMEND)

# Why a connection ended (REASON, "reason", TCPSTATES_REASON): the words,
# in the man page's order, and how the journal's MESSAGE says each.
REASONS = {
    "refused": "connection refused",
    "reset-by-peer": "connection reset by peer",
    "reset-sent": "reset sent",
    "timeout": "timed out",
    "unreachable": "unreachable",
    "aborted": "aborted",
    "closed": "closed",
    "listener-closed": "listener closed",
}
# errno values (asm-generic/errno.h, the same on x86 and arm64) the reasons
# are read from.
ENETUNREACH, ECONNABORTED, ECONNRESET, ETIMEDOUT, ECONNREFUSED, EHOSTUNREACH = (
    101, 103, 104, 110, 111, 113)
# The kernel's reset reasons (enum sk_rst_reason, Linux 6.10+) that mean the
# socket's own process threw the connection away with data unread, or that
# keepalive probes went unanswered. Matched by name: the numbers differ
# between kernels, and are read from the tracepoint's format file.
ABORT_RESETS = ("TCP_ABORT_ON_CLOSE", "TCP_DISCONNECT_WITH_DATA")
KEEPALIVE_RESET = "TCP_KEEPALIVE_TIMEOUT"

# The kernel's hooks, and tunables.
TRACEPOINT = "sock:inet_sock_set_state"
DESTROY_TRACEPOINT = "tcp:tcp_destroy_sock"     # Linux 4.16; optional
# The reasons' hooks, each optional (see REASON_HOOKS below for what each
# one's absence costs).
RESET_IN_TRACEPOINT = "tcp:tcp_receive_reset"
RESET_OUT_TRACEPOINT = "tcp:tcp_send_reset"
ERROR_TRACEPOINT = "sock:inet_sk_error_report"
RETRANSMIT_TRACEPOINT = "tcp:tcp_retransmit_skb"
SYNACK_TRACEPOINT = "tcp:tcp_retransmit_synack"
COUNT_SUBMIT_FAILED, COUNT_GAP = 0, 1     # the program's counters array
COUNT_TRACKED, COUNT_FORGOTTEN = 2, 3      # (entries of the sockets map)
TRACEFS_CANDIDATES = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")
DEFAULT_PERF_PAGES = 256        # per CPU: 1 MiB, about 10,000 events
POLL_TIMEOUT_MS = 20            # a lone event shows within about this long
WAKEUP_EVENTS = 64              # reader wake-ups: one per this many events
REORDER_MARGIN_NS = 2_000_000   # see Reorderer
WRITE_GRACE_S = 2.0             # see StopRequest
WAIT_STEP_MS = 50               # a blocked write looks for a stop this often
PIPE_BUF = 4096                 # writes up to this size to a pipe are atomic

# Kernel ABI numbers: capabilities (linux/capability.h), perf_event_open(2).
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
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

# struct bpf_prog_info (include/uapi/linux/bpf.h): recursion_misses is the
# u64 at offset 208 (Linux 5.12 and later); the kernel says how much of the
# struct it filled.
PROG_INFO_SIZE = 256
PROG_INFO_RECURSION_MISSES = 208

# Stable IDs: one for "a TCP socket changed state", one for "events were
# lost". systemd/tcpstates.catalog explains both to `journalctl -x`.
JOURNAL_MESSAGE_ID = "29e4d369fcd3401e89a1bc2b4ff01360"
JOURNAL_LOST_MESSAGE_ID = "8603391e3ee349579d0092a49adf604f"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_IDENTIFIER = "tcpstates"
LOG_NOTICE, LOG_WARNING = 5, 4
JOURNAL_QUEUE = 65536           # records waiting for journald, at most (see JournalWriter)
JOURNAL_SNDBUF = 8 << 20        # the journal socket's send buffer, as libsystemd asks
JOURNAL_RETRY_S = 1.0           # journald gone: look for it again this often
JOURNAL_BACKOFF_S = 0.0002      # journald's socket queue full: try again after this
JOURNAL_STALL_S = 2.0           # at the end, journald took nothing this long: stop waiting
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# --stuck: a socket that has stayed SECONDS in one of these states (by
# default those where staying means something is wrong) is reported once
# per socket and state, as a row of its own kind (see StuckWatch).
STUCK_STATES = (2, 3, 4, 5, 8, 9, 11)   # SYN_SENT SYN_RECV FIN_WAIT1 FIN_WAIT2
                                        # CLOSE_WAIT LAST_ACK CLOSING
STUCK_CHECK_NS = 1_000_000_000  # the sockets map is read at most this often
STUCK_REPORT = 0x100            # Event.flags, set by user space only: a stuck row
AGE_AT_LEAST = 0x200            # its age is a lower bound (the socket predates
                                # the tracer, its entry into the state unseen)
STUCK_COMM = b"STUCK"           # C-COMM of a stuck row ("STUCK>=": at least)
DEFAULT_MAX_SOCKETS = 131072    # the sockets map (MAX_SOCKETS in the program)
# struct sock_info, as the program lays it out (80 bytes)
SOCK_INFO_STRUCT = struct.Struct("<QQIHH16sHHHH16s16s")
JOURNAL_STUCK_MESSAGE_ID = "91bdd5e7bc024d96bd33b532123d0ce0"

# --lifecycle: one row per socket when it reaches CLOSE (see Lifecycles).
# The states a socket can spend time in, in TCP_STATES order: one CSV column
# each (CLOSE ends the life; LISTEN belongs to listeners, which get no row).
LIFE_STATES = tuple(n for n in TCP_STATES if n not in (7, TCP_LISTEN))
LIFE_UNKNOWN = "?"              # a state's time in the table when not known
DEFAULT_MAX_LIFECYCLES = 131072  # sockets tracked at most (oldest evicted)
JOURNAL_LIFECYCLE_MESSAGE_ID = "36d9f6fc89af41dfaee3ec10074a4f4c"


# The exceptions main() turns into exit statuses and one-line messages.
class UsageError(Exception):
    """A bad option or argument: exit status 2."""


class Fatal(Exception):
    """A runtime failure with a one-line explanation: exit status 1."""


class WriteAborted(Exception):
    """Output stayed blocked until the stop grace ran out; `written` bytes
    of the data had gone out."""

    def __init__(self, written):
        super().__init__(written)
        self.written = written


# ---------------------------------------------------------------------------
# 2. The BPF program. Static text: options reach it as -D defines (cflags)
# and as port sets in BPF maps that Python fills, never by editing it.
# ---------------------------------------------------------------------------
BPF_PROGRAM = r"""
/*
 * tcpstates: one event per TCP state change, from sock:inet_sock_set_state;
 * with WITH_REASONS, also why a connection ended (see "Reasons" below);
 * with WITH_METRICS, the counts behind the metrics (see "Metrics").
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
#define TCP_CLOSING      11

#ifndef MAX_SOCKETS
#define MAX_SOCKETS 131072
#endif
#define MAX_LISTEN_PORTS 16384

/* event.flags */
#define SPAN_KNOWN       1
#define OWNER_KNOWN      2
#define OWNER_INHERITED  4   /* an accepted socket, owner taken from its listener */
#define AMEND            8   /* not an event: facts that came after a CLOSE row */

/* event.rflags: what the kernel said about how a socket ended */
#define R_RST_RECEIVED   1   /* tcp:tcp_receive_reset */
#define R_RST_SENT       2   /* tcp:tcp_send_reset */
#define R_RST_REASON     4   /* rst_reason holds the kernel's reason for it */
#define R_ERRNO          8   /* error holds sock:inet_sk_error_report's errno */
#define R_RETRIES        16  /* retries holds the retransmissions in the state left */

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
    u64 osince;         /* when the owner was learned (ts_ns clock) */
    u16 rflags;         /* R_*: facts about a transition into CLOSE */
    u16 rst_reason;     /* enum sk_rst_reason of a reset sent (R_RST_REASON) */
    u16 error;          /* errno reported for the socket (R_ERRNO) */
    u16 retries;        /* retransmissions in the state left (R_RETRIES) */
};

/* What is known of a live socket: since when it is in its state, and who
 * owns it. LRU: on a host with more live sockets than MAX_SOCKETS the least
 * recently changed are evicted, and their next span and owner are reported
 * as unknown, never as wrong. */
struct sock_info {
    u64 since;
    u64 osince;         /* when opid was learned: user space checks that the
                           process with that PID now is the same one */
    u32 opid;
    u16 oflags;
    u16 state;          /* the last state seen, to find missed transitions */
    char ocomm[16];
    /* The socket's addresses as of its last event, so that --stuck can
     * report a socket that has stopped producing events from this map
     * alone (40 bytes an entry; a client's port is 0 until its first event
     * after CLOSE -> SYN_SENT). */
    u16 family;
    u16 lport;
    u16 rport;
    u16 pad;
    u8 laddr[16];
    u8 raddr[16];
#ifdef WITH_REASONS
    u64 fact_ts;        /* when rflags were learned */
    u16 rflags;         /* resets seen in this state, just before its end */
    u16 rst_reason;
    u32 retries;        /* retransmissions in this state */
#endif
};
BPF_TABLE("lru_hash", u64, struct sock_info, sockets, MAX_SOCKETS);

/* Owners of listening sockets, by (family << 16 | port): an accepted socket's
 * first event (LISTEN -> SYN_RECV) names only its own address, and the
 * tracepoint gives no link to its listener. count is the number of listeners
 * on the key; when listeners of different processes share a key (SO_REUSEPORT,
 * or the same port in two network namespaces) opid is 0: unknown, not a
 * guess. User space seeds it with the listeners that predate the tracer. */
struct listener {
    u64 osince;
    u32 opid;
    u32 count;          /* changed only with atomic adds: listen() calls on
                           two CPUs at once must both count */
    char ocomm[16];
};
BPF_TABLE("lru_hash", u32, struct listener, listeners, MAX_LISTEN_PORTS);

/* Port sets for -L and -D, as bitmaps: bit (port & 63) of word (port >> 6).
 * Filled from Python before the program is attached. */
BPF_ARRAY(local_ports, u64, 1024);
BPF_ARRAY(remote_ports, u64, 1024);

BPF_PERF_OUTPUT(events);

/* Loss the kernel sees, counted where it happens (per CPU, added up by user
 * space at every report and at exit). A full perf ring also announces its
 * loss with a PERF_RECORD_LOST, but only with the next event that fits on
 * that CPU: if the CPU goes quiet, or the tracer stops, that record never
 * comes. These counters cannot miss.
 *   COUNT_SUBMIT_FAILED  perf_submit failed (ring full): the event is lost
 *   COUNT_GAP            a socket in view moved from a state other than the
 *                        last one seen, or was destroyed without its move to
 *                        CLOSE being seen: at least one transition is missing
 *                        (the kernel skipped it, or it was lost) */
#define COUNT_SUBMIT_FAILED 0
#define COUNT_GAP           1
/*   COUNT_TRACKED        entries added to the sockets map
 *   COUNT_FORGOTTEN      entries deleted from it (at CLOSE or destruction):
 *                        what neither holds nor forgot, the LRU evicted */
#define COUNT_TRACKED       2
#define COUNT_FORGOTTEN     3
#define N_COUNTERS          4
BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);

#ifdef WITH_METRICS
/*
 * Metrics (--metrics, --metrics-file, unless user space must count them
 * itself: see metrics_in_kernel in tcpstates.py), counted here so that
 * user space does nothing per event for them; it reads these at a scrape
 * or a file write. Counted for every event in view, before the perf
 * buffer: an event the buffer has no room for is counted all the same.
 * By state number, 0 to METRIC_STATES - 1 (Linux has 14 states; a larger
 * number is not counted, as the man page's METRICS says).
 *   transitions  [old * METRIC_STATES + new]
 *   durations    per state left, METRIC_BUCKETS + 2 words: the spans
 *                (SPAN_KNOWN only) up to each bound (not cumulative), the
 *                ones above the last bound, and the sum of the spans in us
 * Per CPU, and no atomics: nothing runs inside a BPF program on its CPU
 * (the kernel skips a tracepoint hit while one runs, see "Reasons").
 */
#define METRIC_STATES 32
struct metric_counts {
    u64 transitions[METRIC_STATES * METRIC_STATES];
    u64 durations[METRIC_STATES * (METRIC_BUCKETS + 2)];
};
BPF_PERCPU_ARRAY(metric_counts, struct metric_counts, 1);
/* The histogram's bucket bounds in us, ascending, filled by user space
 * before the program is attached (DURATION_BOUNDS_US). */
struct metric_bounds {
    u64 us[METRIC_BUCKETS];
};
BPF_ARRAY(metric_bounds, struct metric_bounds, 1);

static inline void count_metrics(int oldstate, int newstate, u16 flags, u64 span_us)
{
    u32 old = oldstate, new = newstate;
    if (old >= METRIC_STATES || new >= METRIC_STATES)
        return;
    u32 zero = 0;
    struct metric_counts *m = metric_counts.lookup(&zero);
    if (!m)
        return;
    /* clang tests (old | new) once and may then index with another copy
     * of them, which the verifier does not know to be bounded: each index
     * is bounded where it is used, behind a barrier clang cannot see
     * through (libbpf's barrier_var), so that it keeps the test; and
     * 64 bits wide, as a 32-bit index is widened in a copy the verifier
     * does not link to the one tested. */
    u64 pair = old * METRIC_STATES + new;
    asm volatile("" : "+r"(pair));
    m->transitions[pair & (METRIC_STATES * METRIC_STATES - 1)]++;
    if (!(flags & SPAN_KNOWN))
        return;
    struct metric_bounds *b = metric_bounds.lookup(&zero);
    if (!b)
        return;
    u64 bucket = METRIC_BUCKETS;
#pragma unroll
    for (int i = METRIC_BUCKETS - 1; i >= 0; i--)
        if (span_us <= b->us[i])
            bucket = i;
    u64 row = old * (METRIC_BUCKETS + 2);
    asm volatile("" : "+r"(row));
    asm volatile("" : "+r"(bucket));
    if (row > (METRIC_STATES - 1) * (METRIC_BUCKETS + 2) || bucket > METRIC_BUCKETS)
        return;
    m->durations[row + bucket]++;
    m->durations[row + METRIC_BUCKETS + 1] += span_us;
}
#endif

static inline void count(u32 which)
{
    u64 *value = counters.lookup(&which);
    /* atomic: a softirq can interrupt this program on the same CPU */
    if (value)
        __sync_fetch_and_add(value, 1);
}

/* Is a socket with these ports and owner in the user's view (-L, -D, -p)?
 * The family filter is applied before anything else. */
static inline int in_view(u16 lport, u16 rport, u32 opid)
{
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
    if (opid != FILTER_PID)
        return 0;
#endif
    return 1;
}

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

#ifdef WITH_REASONS
/*
 * Reasons. The kernel says why a connection ends through tracepoints that
 * fire in the same context as the socket's move to CLOSE (measured on 6.18,
 * kernel stacks in hand):
 *   refused     tcp_receive_reset, SYN_SENT -> CLOSE, inet_sk_error_report 111
 *   peer reset  tcp_receive_reset, X -> CLOSE, inet_sk_error_report 104
 *   timeout     (timer) X -> CLOSE, inet_sk_error_report 110
 *   ICMP error  X -> CLOSE, inet_sk_error_report 113 (an error 0 before it)
 *   close() with unread data, SO_LINGER 0:  X -> CLOSE, tcp_send_reset
 *               (TCP_ABORT_ON_CLOSE / TCP_STATE), linger 0 also error 104
 * Facts before the move (resets) are kept with the socket (sock_info) and
 * go out with its CLOSE event. Facts after it cannot: the row is already in
 * the perf ring. They go out as a second record (flags AMEND) naming the
 * row by skaddr and time, merged by user space before the row is printed;
 * both are on this CPU's ring, the record after its row.
 *
 * Finding the row of a later fact: every move to CLOSE is written into a
 * per-CPU ring of the last RECENT ones. A fact matches an entry of this
 * CPU's ring by socket address (tcp_send_reset), or, for
 * inet_sk_error_report, which names no socket, by the exact addresses and
 * ports; at most one fact of each kind per entry, the newest entry first,
 * within REASON_WINDOW_NS. Contexts nest (a softirq runs between a close()
 * and its reset: on loopback the reset's own delivery does), so one slot
 * would not do; but nothing runs *inside* a BPF program on its CPU (the
 * kernel skips a tracepoint hit while one runs), so the ring needs no
 * atomics, and a skipped context loses its facts and its CLOSE together.
 * A fact that matches nothing is dropped, never given to another socket.
 *
 * Older kernels (before 6.10) report timeouts and ICMP errors before the
 * move to CLOSE: an error that matches no recent CLOSE is kept as this
 * CPU's pending error, for the next CLOSE with the same addresses and
 * ports within the window.
 */
#ifndef REASON_WINDOW_NS
#define REASON_WINDOW_NS 2000000ULL
#endif
#define RECENT 8

/* Addresses and ports as a socket's tracepoints give them; 8-byte aligned
 * and zero-filled, so that two compare as five u64 words. */
struct tuple {
    u16 family;
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};
#define TUPLE_OF(t, a) do {                                        \
        (t).family = (a)->family;                                  \
        (t).sport = (a)->sport;                                    \
        (t).dport = (a)->dport;                                    \
        if ((t).family == AF_INET) {                               \
            __builtin_memcpy((t).saddr, (a)->saddr, 4);            \
            __builtin_memcpy((t).daddr, (a)->daddr, 4);            \
        } else {                                                   \
            __builtin_memcpy((t).saddr, (a)->saddr_v6, 16);        \
            __builtin_memcpy((t).daddr, (a)->daddr_v6, 16);        \
        }                                                          \
    } while (0)

static inline int same_tuple(struct tuple *a, struct tuple *b)
{
    u64 *x = (u64 *)a, *y = (u64 *)b;
#pragma unroll
    for (int i = 0; i < 5; i++)
        if (x[i] != y[i])
            return 0;
    return 1;
}

struct closed {
    u64 sk;
    u64 ts;             /* the CLOSE event's ts_ns: with sk, names its row */
    u16 submitted;      /* the row went to the ring: amend it */
    u16 amended;        /* R_RST_SENT, R_ERRNO: facts already matched */
    u32 pad;
    struct tuple t;
};
struct recent {
    u32 next;
    u32 pad;
    struct closed slot[RECENT];
    u64 err_ts;         /* the pending error (older kernels' order) */
    u32 err_errno;
    u32 err_pad;
    struct tuple err_t;
};
BPF_PERCPU_ARRAY(recent, struct recent, 1);

/* Facts learned in the state a socket is in, as it leaves it. */
static inline void note_fact(struct sock_info *info, u16 flags, u16 rst_reason)
{
    u64 now = bpf_ktime_get_ns();
    if (now - info->fact_ts > REASON_WINDOW_NS)
        info->rflags = 0;
    info->fact_ts = now;
    info->rflags |= flags;
    if (flags & R_RST_REASON)
        info->rst_reason = rst_reason;
}

/* Send the facts that came after a CLOSE row, to be merged into it. */
static inline void amend(void *ctx, struct closed *c, u16 rflags, u16 rst_reason, u16 error)
{
    struct event ev = {};
    ev.ts_ns = c->ts;
    ev.skaddr = c->sk;
    ev.flags = AMEND;
    ev.rflags = rflags;
    ev.rst_reason = rst_reason;
    ev.error = error;
    if (events.perf_submit(ctx, &ev, sizeof(ev)) != 0)
        count(COUNT_SUBMIT_FAILED);
}
#endif

/* Named on_*, not tracepoint__*: BCC attaches functions of that name as
 * soon as it loads them, and tcpstates attaches by hand once the port maps
 * are filled and the perf rings open, so that no event is ever judged
 * against an empty filter or lost for want of a ring. BCC still builds the
 * argument struct from tracefs, from the parameter's type. */
int on_set_state(struct tracepoint__sock__inet_sock_set_state *args)
{
    /* The tracepoint also fires for SCTP (132) and MPTCP (262). */
    if (args->protocol != IPPROTO_TCP)
        return 0;
#ifdef TEST_SKIP_NEWSTATE
    /* --test-skip: act as the kernel does when it skips a run, so that the
     * tests can check that the gap is found. */
    if (args->newstate == TEST_SKIP_NEWSTATE)
        return 0;
#endif
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
    int gap = 0;
    if (info) {
        stored = 1;
        if (now >= info->since) {
            ev.span_us = (now - info->since) / 1000;
            ev.flags = SPAN_KNOWN;
        }
        /* The chain check: a socket leaves the state it last entered. */
        gap = info->state != oldstate;
#ifdef WITH_REASONS
        if (newstate == TCP_CLOSE) {
            if (info->rflags && now - info->fact_ts <= REASON_WINDOW_NS) {
                ev.rflags = info->rflags;
                ev.rst_reason = info->rst_reason;
            }
            /* counted since the socket entered the state it leaves */
            ev.retries = info->retries > 0xffff ? 0xffff : info->retries;
            ev.rflags |= R_RETRIES;
        }
        info->rflags = 0;
        info->retries = 0;
#endif
    } else {
        info = &blank;
        if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
            struct listener *l = listeners.lookup(&lkey);
            if (l && l->opid) {
                info->opid = l->opid;
                info->osince = l->osince;
                info->oflags = OWNER_KNOWN | OWNER_INHERITED;
                __builtin_memcpy(info->ocomm, l->ocomm, sizeof(info->ocomm));
            }
        }
    }
    /* pid 0 is the idle task: never an owner. */
    if (pid && by_own_syscall(oldstate, newstate)) {
        info->opid = pid;
        info->osince = now;
        info->oflags = OWNER_KNOWN;
        bpf_get_current_comm(&info->ocomm, sizeof(info->ocomm));
    }
    ev.opid = info->opid;
    ev.osince = info->osince;
    ev.flags |= info->oflags;
    __builtin_memcpy(ev.ocomm, info->ocomm, sizeof(ev.ocomm));
    u16 rport = args->dport;
    int view = in_view(lport, rport, ev.opid);
    if (gap && view)
        count(COUNT_GAP);

#ifdef WITH_REASONS
    /* Every move to CLOSE, seen or not, goes into this CPU's ring: the
     * facts that follow it are then taken by it, never by another socket. */
    struct closed *slot = 0;
    if (newstate == TCP_CLOSE) {
        u32 zero = 0;
        struct recent *r = recent.lookup(&zero);
        if (r) {
            struct tuple t = {};
            TUPLE_OF(t, args);
            if (r->err_ts && now - r->err_ts <= REASON_WINDOW_NS &&
                    same_tuple(&r->err_t, &t)) {
                ev.error = r->err_errno;
                ev.rflags |= R_ERRNO;
                r->err_ts = 0;
            }
            slot = &r->slot[r->next & (RECENT - 1)];
            r->next++;
            slot->sk = sk;
            slot->ts = now;
            slot->submitted = 0;
            slot->amended = ev.rflags & (R_RST_SENT | R_ERRNO);
            slot->t = t;
        }
    }
#endif

    /* Bookkeeping for every TCP socket, also those the filters below hide:
     * a socket's first events can carry port 0 (a client's local port is
     * chosen during connect), and its later spans and owner must be right. */
    if (newstate == TCP_CLOSE) {
        if (stored && sockets.delete(&sk) == 0)
            count(COUNT_FORGOTTEN);
    } else {
        info->since = now;
        info->state = newstate;
        info->family = family;
        info->lport = lport;
        info->rport = rport;
        if (family == AF_INET) {
            __builtin_memcpy(info->laddr, args->saddr, 4);
            __builtin_memcpy(info->raddr, args->daddr, 4);
        } else {
            __builtin_memcpy(info->laddr, args->saddr_v6, 16);
            __builtin_memcpy(info->raddr, args->daddr_v6, 16);
        }
        if (!stored) {
            /* insert first: only a new entry counts as tracked (an entry
             * left under this address by a freed socket is replaced) */
            if (sockets.insert(&sk, info) == 0)
                count(COUNT_TRACKED);
            else
                sockets.update(&sk, info);
        }
    }
    if (newstate == TCP_LISTEN) {
        /* Two processes can listen on one key at the same instant (on two
         * CPUs): the entry is created with insert-if-absent, and the count
         * changed only atomically, so that neither listen is lost and a
         * shared key always ends up with an unknown owner, never a wrong
         * one. */
        struct listener fresh_l = {.osince = now, .opid = ev.opid, .count = 1};
        __builtin_memcpy(fresh_l.ocomm, ev.ocomm, sizeof(fresh_l.ocomm));
        if (listeners.insert(&lkey, &fresh_l) != 0) {
            struct listener *l = listeners.lookup(&lkey);
            if (l) {
                __sync_fetch_and_add(&l->count, 1);
                if (l->opid != ev.opid)
                    l->opid = 0;
            }
        }
    } else if (oldstate == TCP_LISTEN && newstate == TCP_CLOSE) {
        struct listener *l = listeners.lookup(&lkey);
        if (l) {
            /* (BPF before v3 cannot use an atomic add's result: LLVM
             * aborts. Read it back; two closes at once may both delete.) */
            __sync_fetch_and_add(&l->count, -1);
            if ((s32)l->count <= 0)
                listeners.delete(&lkey);
        }
    }

    if (!view)
        return 0;
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
#ifdef FILTER_REASONS
    /* --reason: a bit per reason (the order of REASONS in tcpstates.py).
     * Reasons come only with a move to CLOSE. What is decided here stays
     * decided (a listener's close; a reset met while connecting); the
     * rest can still be changed by facts that follow, and is decided in
     * user space, which drops what the user did not ask for. */
    if (newstate != TCP_CLOSE)
        return 0;
    if (oldstate == TCP_LISTEN) {
        if (!(FILTER_REASONS & REASON_BIT_LISTENER_CLOSED))
            return 0;
    } else {
        if (!(FILTER_REASONS & ~REASON_BIT_LISTENER_CLOSED))
            return 0;
        if (oldstate == TCP_SYN_SENT && (ev.rflags & R_RST_RECEIVED) &&
                !(FILTER_REASONS & REASON_BIT_REFUSED))
            return 0;
    }
#endif

#ifdef WITH_METRICS
    count_metrics(oldstate, newstate, ev.flags, ev.span_us);
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
    if (events.perf_submit(args, &ev, sizeof(ev)) != 0) {
        count(COUNT_SUBMIT_FAILED);
        return 0;
    }
#ifdef WITH_REASONS
    if (slot)
        slot->submitted = 1;
#endif
    return 0;
}

#ifdef HAVE_TCP_DESTROY_SOCK
/* A socket is forgotten at CLOSE. If that event never reached us (the
 * kernel skips a tracepoint hit while another BPF program runs on the CPU),
 * its entry would stay until the LRU evicts it: the socket's destruction
 * removes it for sure, and counts the missed transition as a gap. */
int on_destroy(struct tracepoint__tcp__tcp_destroy_sock *args)
{
    u64 sk = (u64)args->skaddr;
    struct sock_info *info = sockets.lookup(&sk);
    if (!info)
        return 0;
    /* Still known: its move to CLOSE, which forgets it, was never seen. */
    int view = in_view(args->sport, args->dport, info->opid);
#ifdef FILTER_FAMILY
    view = view && args->family == FILTER_FAMILY;
#endif
    if (view)
        count(COUNT_GAP);
    if (sockets.delete(&sk) == 0)
        count(COUNT_FORGOTTEN);
    return 0;
}
#endif

#ifdef HAVE_RESET_IN
/* The peer reset the connection (or, in a closing state with the receive
 * side shut, the kernel calls it so before it resets the peer itself for
 * data that came after the close: then a tcp_send_reset follows). */
int on_reset_in(struct tracepoint__tcp__tcp_receive_reset *args)
{
    u64 sk = (u64)args->skaddr;
    struct sock_info *info = sockets.lookup(&sk);
    if (info)
        note_fact(info, R_RST_RECEIVED, 0);
    return 0;
}
#endif

#ifdef HAVE_RESET_OUT
#ifdef HAVE_RST_ENUM
/* The tracepoint's format names this type; BCC copies the field's type into
 * the argument struct, and without kernel headers it must be complete. */
enum sk_rst_reason { SK_RST_REASON_FIRST_ };
#endif
/* This host reset the connection: before the socket's move to CLOSE (a
 * keepalive or orphan timeout, ss -K) or just after it (close() with
 * unread data, SO_LINGER 0, data after close). */
int on_reset_out(struct tracepoint__tcp__tcp_send_reset *args)
{
    u64 sk = (u64)args->skaddr;
    if (!sk)
        return 0;           /* a reply to a packet no socket owns */
    u16 flags = R_RST_SENT, why = 0;
#ifdef HAVE_RST_REASON
    why = args->reason;
    flags |= R_RST_REASON;
#endif
    struct sock_info *info = sockets.lookup(&sk);
    if (info) {
        note_fact(info, flags, why);
        return 0;
    }
    u32 zero = 0;
    struct recent *r = recent.lookup(&zero);
    if (!r)
        return 0;
    u64 now = bpf_ktime_get_ns();
#pragma unroll
    for (int i = 0; i < RECENT; i++) {
        struct closed *c = &r->slot[(r->next - 1 - i) & (RECENT - 1)];
        if (c->sk == sk && now - c->ts <= REASON_WINDOW_NS &&
                !(c->amended & R_RST_SENT)) {
            c->amended |= R_RST_SENT;
            if (c->submitted)
                amend(args, c, flags, why, 0);
            return 0;
        }
    }
    return 0;
}
#endif

#ifdef HAVE_ERROR
/* The error the kernel hands the socket's process: no socket address, so it
 * is matched by addresses and ports (see "Reasons" above). */
int on_error(struct tracepoint__sock__inet_sk_error_report *args)
{
    if (args->protocol != IPPROTO_TCP)
        return 0;
    int error = args->error;
    /* 0: a report for the error queue (timestamps, ICMP with IP_RECVERR),
     * not an error. A peer port of 0: tcp_disconnect (SO_LINGER 0,
     * connect(AF_UNSPEC)) cleared it before reporting ECONNRESET, and the
     * rest of the addresses no longer names one socket: left unmatched. */
    if (error <= 0 || error > 0xffff || args->dport == 0)
        return 0;
    struct tuple t = {};
    TUPLE_OF(t, args);
    u32 zero = 0;
    struct recent *r = recent.lookup(&zero);
    if (!r)
        return 0;
    u64 now = bpf_ktime_get_ns();
#pragma unroll
    for (int i = 0; i < RECENT; i++) {
        struct closed *c = &r->slot[(r->next - 1 - i) & (RECENT - 1)];
        if (c->ts && now - c->ts <= REASON_WINDOW_NS && !(c->amended & R_ERRNO) &&
                same_tuple(&c->t, &t)) {
            c->amended |= R_ERRNO;
            if (c->submitted)
                amend(args, c, R_ERRNO, 0, error);
            return 0;
        }
    }
    r->err_ts = now;
    r->err_errno = error;
    r->err_t = t;
    return 0;
}
#endif

#ifdef HAVE_RETRANSMIT
/* Retries: retransmissions of a socket in its current state (SYN_SENT: of
 * its SYN). The kernel holds the socket's lock here and at its state
 * changes, so a plain increment is safe. And a connecting socket's local
 * port: the kernel picks it just after the move to SYN_SENT, whose event
 * has port 0, and a connect nobody answers has no event after that; its
 * SYN sent again carries the port, which --stuck then reports. */
int on_retransmit(struct tracepoint__tcp__tcp_retransmit_skb *args)
{
    u64 sk = (u64)args->skaddr;
    struct sock_info *info = sockets.lookup(&sk);
    if (!info)
        return 0;
#ifdef WITH_REASONS
    info->retries++;
#endif
    if (info->state == TCP_SYN_SENT && info->lport == 0)
        info->lport = args->sport;
    return 0;
}
#endif

#ifdef HAVE_SYNACK
/* A SYN-ACK sent again. For a plain connection request skaddr is the
 * listener (the request has no row of its own); for a fast-open child,
 * a full socket in SYN_RECV, it is the child's. */
int on_synack(struct tracepoint__tcp__tcp_retransmit_synack *args)
{
    u64 sk = (u64)args->skaddr;
    struct sock_info *info = sockets.lookup(&sk);
    if (info && info->state == TCP_SYN_RECV)
        info->retries++;
    return 0;
}
#endif
"""


# ---------------------------------------------------------------------------
# 3. Text helpers: states, safe text, addresses, process names, the clock,
# processes and cgroups.
# ---------------------------------------------------------------------------
TCP_SYN_SENT, TCP_FIN_WAIT2, TCP_CLOSE, TCP_LAST_ACK, TCP_CLOSING = 2, 5, 7, 9, 11

# What is known of why a connection ended, as every output shows it: the
# reason's word (one of REASONS, None when unknown), the REASON column's
# text (the word and its detail, UNKNOWN), the errno the kernel reported,
# the retransmissions in the state left, the reset's reason as the kernel
# names it, and the journal MESSAGE's phrase.
Reason = collections.namedtuple("Reason", "word text errno retries reset phrase")
NO_REASON = Reason(None, UNKNOWN, None, None, None, None)


def decide_reason(oldstate, newstate, rflags, rst_reason, error, retries, reset_names):
    """Why a socket moved to CLOSE, from what the kernel said in the same
    context (see "Reasons" in the BPF program), as a Reason. Only what the
    facts show, in this order (the first that applies):
      LISTEN -> CLOSE                                   listener-closed
      errno 110 (ETIMEDOUT)                             timeout
      errno 103 (ECONNABORTED: ss -K)                   aborted
      a reset sent: the kernel's reason TCP_ABORT_ON_CLOSE or
        TCP_DISCONNECT_WITH_DATA (data left unread)     aborted
        TCP_KEEPALIVE_TIMEOUT                           timeout
        any other, or none given                        reset-sent
      a reset received: in SYN_SENT                     refused
        in any other state                              reset-by-peer
      errno 111 (ECONNREFUSED)                          refused
      errno 113 or 101 (EHOSTUNREACH, ENETUNREACH)      unreachable
      FIN_WAIT2 -> CLOSE (our FIN acknowledged)         closed
      LAST_ACK or CLOSING -> CLOSE, no retransmission in that state (so no
        timeout: the last ACK came)                     closed
    Anything else is unknown: errno 104 alone (the kernel also reports it to
    a socket that sent the reset itself), a connect given up by close(), a
    timeout of a socket no process holds any more (no error is reported)."""
    if newstate != TCP_CLOSE:
        return NO_REASON
    errno = error if rflags & R_ERRNO else None
    count = retries if rflags & R_RETRIES else None
    reset = None
    if rflags & R_RST_SENT and rflags & R_RST_REASON:
        reset = reset_names.get(rst_reason) or str(rst_reason)
    word = detail = None
    if oldstate == TCP_LISTEN:
        word = "listener-closed"
    elif errno == ETIMEDOUT or reset == KEEPALIVE_RESET:
        word = "timeout"
        if reset == KEEPALIVE_RESET:
            detail = "keepalive"
        elif count is not None:
            detail = "%d-retr%s" % (count, "y" if count == 1 else "ies")
    elif errno == ECONNABORTED or reset in ABORT_RESETS:
        word = "aborted"
    elif rflags & R_RST_SENT:
        word = "reset-sent"
        if reset and reset != "NOT_SPECIFIED":
            detail = reset
    elif rflags & R_RST_RECEIVED:
        word = "refused" if oldstate == TCP_SYN_SENT else "reset-by-peer"
    elif errno == ECONNREFUSED:
        word = "refused"
    elif errno in (EHOSTUNREACH, ENETUNREACH):
        word = "unreachable"
    elif oldstate == TCP_FIN_WAIT2 or (oldstate in (TCP_LAST_ACK, TCP_CLOSING) and count == 0):
        word = "closed"
    if word is None:
        return Reason(None, UNKNOWN, errno, count, reset, None)
    text, phrase = word, REASONS[word]
    if detail:
        text = "%s:%s" % (word, detail)
        phrase = "%s (%s)" % (phrase, detail.replace("-", " "))
    if errno is not None:
        phrase += ", errno %d" % errno
    return Reason(word, text, errno, count, reset, phrase)


class Reasons:
    """decide_reason for events, cached (few distinct facts recur), with
    this kernel's names of its reset reasons (read on first use). The row
    functions take what they show of a move to CLOSE straight from a cache
    keyed by ev[8:10] + ev[16:20], its states and facts (cached(render))."""

    def __init__(self, reset_names=None):
        self._names = reset_names
        self._cache = _Cache(self._decide)

    def _decide(self, key):
        if self._names is None:
            self._names = reset_reason_names()
        return decide_reason(*key, self._names)

    def cached(self, render):
        """A cache: states and facts -> render(their Reason)."""
        return _Cache(lambda key: render(self._cache[key]))

    def __call__(self, ev):
        if ev[9] != TCP_CLOSE:
            return NO_REASON
        return self._cache[ev[8:10] + ev[16:20]]


def state_name(number):
    """Name of a kernel TCP state number; unknown numbers print as digits."""
    return TCP_STATES.get(number) or str(number)


def state_number(name):
    """The state number for a name as this tool or ss(8) prints it, any case."""
    key = name.strip().upper().replace("-", "_")
    for number, known in TCP_STATES.items():
        if known == key:
            return number
    return STATE_ALIASES.get(key)


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


def _comm_text(raw):
    name = raw.split(b"\0", 1)[0]
    return safe_text(name.decode("utf-8", "surrogateescape"))


COMM_TEXTS = _Cache(_comm_text)


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


def endpoint_text(family, raw, port):
    address = address_text(family, raw)
    if family == socket.AF_INET6:
        return "[%s]:%d" % (address, port)
    return "%s:%d" % (address, port)


def csv_cell(text):
    """A text as one RFC 4180 cell, as the csv module would write it, with
    spreadsheet formulas defused (see FORMULA_STARTS)."""
    if text[:1] in FORMULA_STARTS and text != UNKNOWN:
        text = "'" + text
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


_json_str = json.JSONEncoder(ensure_ascii=True).encode


def as_event(ev):
    """Events travel as plain tuples in Event's field order (the readers
    make them in one C call); the slower paths name the fields."""
    return ev if isinstance(ev, Event) else Event._make(ev)


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


class ProcessCache:
    """What /proc says of a process: whether it is the process that owned a
    socket at a given moment and still runs, its name, its cgroup.

    A PID outlives nothing: the owner may have exited, and its PID may have
    been given to another process, before a row is printed. The process
    with that PID now is the owner only if it started no later than the
    moment the kernel saw it own the socket (its start time, from
    /proc/PID/stat, in clock ticks since boot). Whether it still runs is
    asked of the kernel once per batch of rows (refresh), through a pidfd
    held for it: a pidfd names one process, not a PID, and becomes readable
    when that process exits (a zombie has exited). Name and cgroup are kept
    a second."""

    TTL_NS = 1_000_000_000
    LIMIT = 256                 # pidfds held at most (file limits are often 1024)
    GONE = (None, "", "")

    def __init__(self, proc="/proc"):
        self.proc = proc
        self._cache = {}        # pid -> [expiry, (start, name, cgroup), pidfd, generation]
        self.generation = 0
        self.tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        # Start times count from boot (CLOCK_BOOTTIME); events are stamped
        # with CLOCK_MONOTONIC, which stands still while the host sleeps.
        self.boot_minus_mono = (time.clock_gettime_ns(time.CLOCK_BOOTTIME)
                                - time.monotonic_ns())

    def refresh(self):
        """A new batch: ask again whether the processes still run."""
        self.generation += 1

    def get(self, pid):
        """(start time on the events' clock or None if gone, name, cgroup)."""
        now = time.monotonic_ns()
        hit = self._cache.get(pid)
        if hit is not None:
            if hit[2] is not None and hit[3] != self.generation:
                hit[3] = self.generation
                if select.select([hit[2]], [], [], 0)[0]:       # it has exited
                    hit[1] = self.GONE
            if hit[0] > now:
                return hit[1]
            self._forget(pid)
        if len(self._cache) >= self.LIMIT:
            for cached in list(self._cache):
                self._forget(cached)
        value, pidfd = self.read(pid)
        self._cache[pid] = [now + self.TTL_NS, value, pidfd, self.generation]
        return value

    def _forget(self, pid):
        pidfd = self._cache.pop(pid)[2]
        if pidfd is not None:
            os.close(pidfd)

    def read(self, pid):
        """(start, name, cgroup) of a running process, or GONE; and a pidfd
        for it, taken first so that it names the process read (None where
        pidfds are not to be had: then liveness is as old as the TTL)."""
        pidfd = None
        try:
            if self.proc == "/proc":            # (not for a test's made-up /proc)
                pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return self.GONE, None
        except (OSError, AttributeError):
            pass
        value = self._read_proc(pid)
        if value is self.GONE and pidfd is not None:
            os.close(pidfd)
            pidfd = None
        return value, pidfd

    def _read_proc(self, pid):
        base = "%s/%d/" % (self.proc, pid)
        try:
            with open(base + "stat", "rb") as f:
                stat_line = f.read()
            with open(base + "cgroup", "rb") as f:
                cgroup_lines = f.read().decode("utf-8", "surrogateescape").splitlines()
        except (OSError, ValueError):
            return self.GONE
        # "pid (name) state ...": the name may hold spaces and parentheses.
        head, _, rest = stat_line.rpartition(b")")
        fields = rest.split()
        try:
            state, start_ticks = fields[0], int(fields[19])   # fields 3 and 22
        except (IndexError, ValueError):
            return self.GONE
        if state in (b"Z", b"X"):                   # exited, not yet reaped
            return self.GONE
        name = safe_text(head.partition(b"(")[2].decode("utf-8", "surrogateescape"))
        start = start_ticks * self.tick_ns - self.boot_minus_mono
        return (start, name, safe_text(cgroup_path(cgroup_lines)))

    def owner(self, ev):
        """The owner of an event as (pid, name, how learned, cgroup), or None
        when unknown. An inherited owner that has exited (or whose PID now
        belongs to another process) is unknown: the accepted socket is
        someone else's by now. An owner that made the socket's own system
        call stays its owner after it exits; its name is then the one the
        kernel recorded (that of the calling thread) and its cgroup ""."""
        flags = ev[10]
        if not flags & OWNER_KNOWN:
            return None
        pid = ev[4]
        start, name, cgroup = self.get(pid)
        same = start is not None and start <= ev[15]
        if flags & OWNER_INHERITED:
            return (pid, name, OWNER_LISTENER, cgroup) if same else None
        if same:
            return (pid, name, OWNER_SELF, cgroup)
        return (pid, comm_text(ev[14]), OWNER_SELF, "")


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


# ---------------------------------------------------------------------------
# 4. Output: one Formatter for table, wide, CSV and JSON rows; journal records.
# ---------------------------------------------------------------------------
def _title_conversion(conv):
    """A row's conversion for the header's title: same width, type "s"."""
    flags_width, _, precision = conv[:-1].partition(".")
    if conv[-1] == "s" and precision:
        return "%s.%ss" % (flags_width, precision)
    return flags_width + "s"


class Formatter:
    """Turns events into output lines for one mode: "table", "wide", "csv"
    or "json". The header and the rows are both built from COLUMNS.

    clock and procs are seams for tests (a fixed clock, a fake /proc)."""

    def __init__(self, args, *, clock=None, procs=None, reasons=None):
        self.args = args
        self.mode = ("json" if args.json else "csv" if args.csv
                     else "wide" if args.wide else "table")
        self.clock = clock or Clock()
        self.procs = procs or ProcessCache()
        self.reasons = reasons or Reasons()
        self.show_reason = bool(args.extended or args.reasons)
        self.columns = self._columns()
        self.row = self._fast_row()

    def _columns(self):
        """(title, conversion or None) of every column of the mode, in order:
        None for a column the row carries but the mode does not show."""
        if self.mode == "json":
            return []
        index = ("table", "wide", "csv").index(self.mode) + 1
        chosen = []
        for column in COLUMNS:
            title, conv = column[0], column[index]
            if title == "TIME" and not self.args.time:
                continue
            if title == "TIME(s)" and not self.args.timestamp:
                continue
            if title in OWNER_TITLES and not self.args.extended:
                continue
            if title == REASON_TITLE:
                if not self.show_reason:
                    continue
                if not self.args.extended and conv:
                    conv = "%s"         # the last column: no trailing blanks
            if title == "MS" and (self.args.extended or self.show_reason) \
                    and self.mode != "csv":
                conv = EXTENDED_MS
            chosen.append((title, conv))
        return chosen

    def header_fields(self):
        return [title for title, conv in self.columns if conv is not None]

    def header(self):
        if self.mode == "json":
            return ""
        if self.mode == "csv":
            return ",".join(self.header_fields()) + "\n"
        return self._format(title=True) % tuple(t for t in self.header_fields() if t != "->")

    def _format(self, title=False):
        """The printf format of a row (or of the header): shown columns joined
        by a space (CSV: a comma); a hidden one takes its value and prints
        nothing ("%.0s"), without a separator; the arrow is text, not a
        value (one argument less per row)."""
        sep = "," if self.mode == "csv" else " "
        parts, hidden = [], ""
        for name, conv in self.columns:
            if name == "->":                    # no value: the arrow itself
                if conv is not None:
                    parts.append(hidden + name)
                    hidden = ""
                continue
            if conv is None:
                if not title:
                    hidden += "%.0s"
                continue
            parts.append(hidden + (_title_conversion(conv) if title else conv))
            hidden = ""
        return sep.join(parts) + hidden + "\n"

    # -- the per-event fast path ---------------------------------------------
    def _fast_row(self):
        """A function event tuple -> output line, specialised for the mode:
        one %-format per event, with every text that repeats (addresses,
        names, states) taken from bounded caches. Events are plain tuples in
        Event's field order; the row functions unpack them once, by name."""
        a4 = _Cache(lambda raw: socket.inet_ntop(socket.AF_INET, raw[:4]))
        a6 = _Cache(lambda raw: socket.inet_ntop(socket.AF_INET6, raw))
        st = _Cache(state_name)
        if self.mode == "json":
            return self._json_row(a4, a6, st)
        return self._text_row(a4, a6, st)

    def _json_row(self, a4, a6, st):
        af_inet, span_known, owner_of = socket.AF_INET, SPAN_KNOWN, self.procs.owner
        cj = _Cache(lambda raw: _json_str(comm_text(raw)))
        rfc, since = self.clock.rfc3339, self.clock.since_first
        # the owner's four keys and the reason's four as one piece each
        fmt = JSON_LINE.replace(JSON_OWNER, "%s").replace(JSON_REASON, "%s")
        oj = _Cache(lambda owner: JSON_OWNER % (
            owner[0], _json_str(owner[1]), _json_str(owner[2]), _json_str(owner[3])))
        no_owner = JSON_OWNER % ("null", "null", "null", "null")
        close = TCP_CLOSE
        rj = self.reasons.cached(lambda reason: JSON_REASON % _reason_json(reason))
        no_reason = JSON_REASON % _reason_json(NO_REASON)

        def json_row(ev):
            ts, sk, span, pid, _op, lport, rport, family, old, new, flags, \
                laddr, raddr, comm, _oc, _os, _rf, _rr, _er, _re = ev
            if family == af_inet:
                la, ra, ip = a4[laddr], a4[raddr], 4
            else:
                la, ra, ip = a6[laddr], a6[raddr], 6
            owner = owner_of(ev)
            return fmt % (rfc(ts), since(ts), sk, ip, la, lport, ra, rport, st[old], st[new],
                          span if flags & span_known else "null", pid, cj[comm],
                          no_owner if owner is None else oj[owner],
                          no_reason if new != close else rj[ev[8:10] + ev[16:20]])
        return json_row

    def _text_row(self, a4, a6, st):
        af_inet, owner_of = socket.AF_INET, self.procs.owner
        if self.mode == "csv":
            cc = _Cache(lambda raw: csv_cell(comm_text(raw)))
            cell = _Cache(csv_cell)
        else:
            cc = COMM_TEXTS
            cell = _Cache(str)
        fmt = self._format()
        want_time, want_ts = self.args.time, self.args.timestamp
        extended, show_reason = self.args.extended, self.show_reason

        def core(ev):
            _ts, sk, span, pid, _op, lport, rport, family, old, new, _fl, \
                laddr, raddr, comm, _oc, _os, _rf, _rr, _er, _re = ev
            if family == af_inet:
                la, ra, ip = a4[laddr], a4[raddr], "4"
            else:
                la, ra, ip = a6[laddr], a6[raddr], "6"
            return (sk, pid, cc[comm], ip, la, lport, ra, rport, st[old], st[new],
                    span / 1000)

        if not (want_time or want_ts or extended or show_reason):
            # core() inlined: the common case, one call less per event
            def plain_row(ev):
                _ts, sk, span, pid, _op, lport, rport, family, old, new, _fl, \
                    laddr, raddr, comm, _oc, _os, _rf, _rr, _er, _re = ev
                if family == af_inet:
                    la, ra, ip = a4[laddr], a4[raddr], "4"
                else:
                    la, ra, ip = a6[laddr], a6[raddr], "6"
                return fmt % (sk, pid, cc[comm], ip, la, lport, ra, rport, st[old], st[new],
                              span / 1000)
            return plain_row

        time_of, since_first = self.clock.hms, self.clock.since_first
        unknown = (UNKNOWN,) * 4
        close, dash = TCP_CLOSE, (UNKNOWN,)
        reason_cell = self.reasons.cached(lambda reason: (reason.text,))
        # the owner's columns, made once per distinct owner
        owner_cells = _Cache(lambda owner: (owner[0], cell[owner[1]], owner[2], cell[owner[3]]))

        def full_row(ev):
            head = ()
            if want_time:
                head = (time_of(ev[0]),)
            if want_ts:
                head += (since_first(ev[0]),)
            tail = ()
            if show_reason:
                tail = dash if ev[9] != close else reason_cell[ev[8:10] + ev[16:20]]
            if extended:
                owner = owner_of(ev)
                tail += unknown if owner is None else owner_cells[owner]
            return fmt % (head + core(ev) + tail)
        return full_row


class StuckFormatter:
    """Rows for --stuck reports, in the mode of a Formatter and under its
    header. A stuck row is a row of the same columns, so that CSV readers
    keep working: OLDSTATE = NEWSTATE = the state the socket is stuck in,
    MS its age in that state so far, C-PID the socket's owner (0 if
    unknown: no task is on a CPU for something that does not happen) and
    C-COMM the word STUCK, or STUCK>= when the age is only a lower bound
    (the socket predates the tracer); the table then also shows MS as
    ">=N". A transition never has OLDSTATE = NEWSTATE. In JSON the line has
    "kind": "stuck" first and "age_at_least" last; a line without "kind"
    is a transition, as before."""

    def __init__(self, formatter):
        self.f = formatter
        self.mode = formatter.mode
        sep = "," if self.mode == "csv" else " "
        parts = []
        for title, conv in formatter.columns:
            if conv is None:
                continue
            if title == "->":
                parts.append("->")
            elif title == "MS":
                parts.append(_title_conversion(conv))   # a text: ">=" may lead
            else:
                parts.append(conv)
        self.fmt = sep.join(parts) + "\n"
        self.titles = [t for t, c in formatter.columns if c is not None and t != "->"]

    def row(self, ev):
        ev = as_event(ev)
        f = self.f
        if self.mode == "json":
            line = f.row(ev)
            return '{"kind":"stuck",%s,"age_at_least":%s}\n' % (
                line[1:-2], "true" if ev.flags & AGE_AT_LEAST else "false")
        at_least = ev.flags & AGE_AT_LEAST
        csv_mode = self.mode == "csv"
        cell = csv_cell if csv_mode else str
        owner = f.procs.owner(ev)
        values = {
            "TIME": f.clock.hms(ev.ts_ns), "TIME(s)": f.clock.since_first(ev.ts_ns),
            "SKADDR": ev.skaddr, "C-PID": ev.pid, "C-COMM": comm_text(ev.comm),
            "IP": ip_version(ev.family),
            "LADDR": address_text(ev.family, ev.laddr), "LPORT": ev.lport,
            "RADDR": address_text(ev.family, ev.raddr), "RPORT": ev.rport,
            "OLDSTATE": state_name(ev.oldstate), "NEWSTATE": state_name(ev.newstate),
            "MS": "%s%.3f" % (">=" if at_least and not csv_mode else "", ev.span_us / 1000),
            "REASON": UNKNOWN,          # nothing has ended
        }
        if owner is None:
            values.update(dict.fromkeys(OWNER_TITLES, UNKNOWN))
        else:
            values.update(zip(OWNER_TITLES, (owner[0], cell(owner[1]), owner[2],
                                             cell(owner[3]))))
        return self.fmt % tuple(values[t] for t in self.titles)


# A socket's whole life (--lifecycle), as Lifecycles gives it out when the
# socket reaches CLOSE: ts_ns of the CLOSE event; lifetime_us from its first
# event seen (at_least: that was not its first transition, the socket
# predates the tracer or its start was hidden); owner as ProcessCache.owner
# gives it; states, [(state number, us or None if unknown)] in the order
# first passed.
Life = collections.namedtuple("Life", (
    "ts_ns", "skaddr", "family", "laddr", "lport", "raddr", "rport",
    "lifetime_us", "at_least", "owner", "states", "reason"), defaults=(NO_REASON,))


def life_states_text(states):
    """The compact per-state times: "SYN_SENT=0.065 ESTABLISHED=250.298" (ms),
    "?" for a time not known."""
    return " ".join("%s=%s" % (state_name(n), LIFE_UNKNOWN if us is None else "%.3f" % (us / 1000))
                    for n, us in states)


class LifeFormatter:
    """Rows for --lifecycle, in the mode of a Formatter: one per socket, with
    a header of its own (the output holds no transition rows then).
    Table and wide: [TIME] [TIME(s)] SKADDR O-PID O-COMM [IP] LADDR LPORT
    RADDR RPORT MS [O-FROM CGROUP] STATES, MS the lifetime (">=N" when a
    lower bound), STATES the compact per-state times. CSV: the same columns
    but STATES, with AT_LEAST (1: MS is a lower bound) after MS, and then one
    column per state of LIFE_STATES, in ms, empty where the socket did not
    pass, "-" where its time there is unknown. JSON: "kind": "lifecycle"
    first, "states" an object state -> ms (null: unknown)."""

    def __init__(self, formatter):
        self.f = formatter
        self.mode = formatter.mode
        args = formatter.args
        titles = []
        if args.time:
            titles.append("TIME")
        if args.timestamp:
            titles.append("TIME(s)")
        titles += ["SKADDR", "O-PID", "O-COMM"]
        if self.mode in ("wide", "csv"):
            titles.append("IP")
        titles += ["LADDR", "LPORT", "RADDR", "RPORT", "MS"]
        if self.mode == "csv":
            titles.append("AT_LEAST")
        if args.extended:
            titles += ["O-FROM", "CGROUP"]
        titles.append("REASON")                 # why it ended (see REASONS)
        if self.mode == "csv":
            titles += [state_name(n) for n in LIFE_STATES]
        else:
            titles.append("STATES")
        self.titles = titles
        if self.mode == "csv":
            self.fmt = ",".join(["%s"] * len(titles)) + "\n"
            return
        wide = self.mode == "wide"
        convs = {c[0]: c[2 if wide else 1] for c in COLUMNS}
        convs.update({"O-PID": "%-7s", "O-COMM": "%-16.16s", "MS": "%-11s", "STATES": "%s"})
        self.fmt = " ".join(convs[t] for t in titles) + "\n"
        self.header_fmt = " ".join(_title_conversion(convs[t]) for t in titles) + "\n"

    def header(self):
        if self.mode == "json":
            return ""
        if self.mode == "csv":
            return ",".join(self.titles) + "\n"
        return self.header_fmt % tuple(self.titles)

    def row(self, life):
        f = self.f
        owner = life.owner
        ms = life.lifetime_us / 1000
        if self.mode == "json":
            states = ",".join('"%s":%s' % (state_name(n), "null" if us is None else
                                           "%.3f" % (us / 1000)) for n, us in life.states)
            if owner is None:
                owner = ("null",) * 4
            else:
                owner = (owner[0], _json_str(owner[1]), _json_str(owner[2]), _json_str(owner[3]))
            return ('{"kind":"lifecycle","time":"%s","elapsed":%.6f,"skaddr":"%x","ip":%s,'
                    '"laddr":"%s","lport":%d,"raddr":"%s","rport":%d,"lifetime_ms":%.3f,'
                    '"lifetime_at_least":%s,"states":{%s},"owner_pid":%s,"owner_comm":%s,'
                    '"owner_from":%s,"owner_cgroup":%s,"reason":%s,"errno":%s,'
                    '"retries":%s,"reset_reason":%s}\n' % (
                        (f.clock.rfc3339(life.ts_ns), f.clock.since_first(life.ts_ns),
                         life.skaddr, ip_version(life.family),
                         address_text(life.family, life.laddr), life.lport,
                         address_text(life.family, life.raddr), life.rport, ms,
                         "true" if life.at_least else "false", states) + owner
                        + _reason_json(life.reason)))
        csv_mode = self.mode == "csv"
        cell = csv_cell if csv_mode else str
        values = {
            "TIME": f.clock.hms(life.ts_ns), "TIME(s)": f.clock.since_first(life.ts_ns),
            "SKADDR": life.skaddr, "IP": ip_version(life.family),
            "LADDR": address_text(life.family, life.laddr), "LPORT": life.lport,
            "RADDR": address_text(life.family, life.raddr), "RPORT": life.rport,
            "MS": "%s%.3f" % (">=" if life.at_least and not csv_mode else "", ms),
            "AT_LEAST": "1" if life.at_least else "0",
            "REASON": cell(life.reason.text),
        }
        if csv_mode:
            values["SKADDR"] = "%x" % life.skaddr
        if owner is None:
            values.update(dict.fromkeys(OWNER_TITLES, UNKNOWN))
            values["O-COMM"] = UNKNOWN
        else:
            values.update(zip(OWNER_TITLES, (owner[0], cell(owner[1]), owner[2],
                                             cell(owner[3]))))
        if csv_mode:
            passed = dict(life.states)
            for n in LIFE_STATES:
                us = passed.get(n, "")
                values[state_name(n)] = (UNKNOWN if us is None else
                                         "" if us == "" else "%.3f" % (us / 1000))
        else:
            values["STATES"] = life_states_text(life.states)
        return self.fmt % tuple(values[t] for t in self.titles)


def lifecycle_fields(life, clock):
    """The journal record of a socket's whole life: addresses, ports and
    owner as in a transition's record, its own MESSAGE_ID, the lifetime and
    the per-state times (TCPSTATES_STATES, and one TCPSTATES_MS_<STATE> field
    per state passed whose time is known)."""
    v = "IPV4" if life.family == socket.AF_INET else "IPV6"
    owner = life.owner
    who = ("%s[%d]" % (owner[1], owner[0])) if owner else "unknown owner"
    states = life_states_text(life.states)
    fields = {
        "MESSAGE": "%s: %s \u2192 %s closed after %s%.3f ms: %s" % (
            who, endpoint_text(life.family, life.laddr, life.lport),
            endpoint_text(life.family, life.raddr, life.rport),
            "at least " if life.at_least else "", life.lifetime_us / 1000, states),
        "MESSAGE_ID": JOURNAL_LIFECYCLE_MESSAGE_ID,
        "PRIORITY": str(LOG_NOTICE),
        "SYSLOG_IDENTIFIER": JOURNAL_IDENTIFIER,
    }
    if owner:
        if owner[3]:
            fields["OBJECT_PID"] = str(owner[0])
        fields["TCPSTATES_OWNER_PID"] = str(owner[0])
        fields["TCPSTATES_OWNER_COMM"] = owner[1]
        fields["TCPSTATES_OWNER_FROM"] = owner[2]
    fields["OBJECT_%s_SOURCE_ADDRESS" % v] = address_text(life.family, life.laddr)
    fields["OBJECT_TCP_SOURCE_PORT"] = str(life.lport)
    fields["OBJECT_%s_DESTINATION_ADDRESS" % v] = address_text(life.family, life.raddr)
    fields["OBJECT_TCP_DESTINATION_PORT"] = str(life.rport)
    fields["TCPSTATES_SOCKET"] = "%x" % life.skaddr
    fields["TCPSTATES_IP_VERSION"] = ip_version(life.family)
    fields["TCPSTATES_EVENT_REALTIME_USEC"] = str((life.ts_ns + clock.wall_minus_mono) // 1000)
    fields["TCPSTATES_EVENT_MONOTONIC_USEC"] = str(life.ts_ns // 1000)
    fields["TCPSTATES_LIFETIME_USEC"] = str(life.lifetime_us)
    fields["TCPSTATES_LIFETIME_AT_LEAST"] = "1" if life.at_least else "0"
    fields["TCPSTATES_STATES"] = states
    reason = life.reason
    if reason.word:
        fields["TCPSTATES_REASON"] = reason.word
        fields["MESSAGE"] += " (%s)" % (reason.phrase or reason.word)
    if reason.errno is not None:
        fields["ERRNO"] = str(reason.errno)
    if reason.retries is not None:
        fields["TCPSTATES_RETRIES"] = str(reason.retries)
    if reason.reset:
        fields["TCPSTATES_RESET_REASON"] = reason.reset
    for n, us in life.states:
        if us is not None:
            fields["TCPSTATES_MS_%s" % state_name(n)] = "%.3f" % (us / 1000)
    return fields


def stuck_fields(ev, clock, owner):
    """The journal record of a stuck report: the fields of a transition's
    record where they mean the same (addresses, ports, owner, OBJECT_TCP_
    OLD_STATE = NEW_STATE = the state), its own MESSAGE_ID, PRIORITY 4
    (warning), and the age. No on-CPU task, no span."""
    ev = as_event(ev)
    fields = journal_fields(ev, clock, owner)
    for name in ("OBJECT_TCP_SPAN_TIME", "TCPSTATES_ONCPU_PID", "TCPSTATES_ONCPU_COMM"):
        fields.pop(name, None)
    at_least = bool(ev.flags & AGE_AT_LEAST)
    who = ("%s[%d]" % (owner[1], owner[0])) if owner else "unknown owner"
    fields["MESSAGE"] = "%s: %s \u2192 %s stuck in %s for %s%.3f s" % (
        who, endpoint_text(ev.family, ev.laddr, ev.lport),
        endpoint_text(ev.family, ev.raddr, ev.rport), state_name(ev.newstate),
        "at least " if at_least else "", ev.span_us / 1e6)
    fields["MESSAGE_ID"] = JOURNAL_STUCK_MESSAGE_ID
    fields["PRIORITY"] = str(LOG_WARNING)
    fields["TCPSTATES_STUCK_STATE"] = state_name(ev.newstate)
    fields["TCPSTATES_STUCK_AGE_USEC"] = str(ev.span_us)
    fields["TCPSTATES_AGE_AT_LEAST"] = "1" if at_least else "0"
    return fields
def _reason_json(reason):
    """The four JSON values of a Reason: reason, errno, retries, reset_reason."""
    return (_json_str(reason.word) if reason.word else "null",
            "null" if reason.errno is None else str(reason.errno),
            "null" if reason.retries is None else str(reason.retries),
            _json_str(reason.reset) if reason.reset else "null")


def lost_fields(lost, total, gaps=0, gaps_total=0, unsent=0, unsent_total=0):
    """The journal record of a period's loss: events lost or skipped by the
    kernel, transitions found missing from sockets' histories, and records
    that could not be sent to the journal."""
    parts = []
    if lost or not (gaps or unsent):
        parts.append("lost %d events (%d since start)" % (lost, total))
    if gaps:
        parts.append("found %d transitions missing from sockets' histories (%d since start)"
                     % (gaps, gaps_total))
    if unsent:
        parts.append("could not send %d records to the journal (%d since start)"
                     % (unsent, unsent_total))
    return {
        "MESSAGE": "tcpstates %s: the journal has a gap" % " and ".join(parts),
        "MESSAGE_ID": JOURNAL_LOST_MESSAGE_ID,
        "PRIORITY": str(LOG_WARNING),
        "SYSLOG_IDENTIFIER": JOURNAL_IDENTIFIER,
        "TCPSTATES_LOST": str(lost),
        "TCPSTATES_LOST_TOTAL": str(total),
        "TCPSTATES_GAPS": str(gaps),
        "TCPSTATES_GAPS_TOTAL": str(gaps_total),
        "TCPSTATES_UNSENT": str(unsent),
        "TCPSTATES_UNSENT_TOTAL": str(unsent_total),
    }


def journal_fields(ev, clock, owner, reason=NO_REASON):
    """The journal record of one event, as an ordered dict of fields; owner
    as ProcessCache.owner gives it, reason as Reasons gives it. The plain
    statement of the record: JournalWriter sends the same fields, made
    faster (journal_entry_function).

    Field names are the upstream bcc tool's where it has them, so existing
    queries keep working. OBJECT_PID is the socket's owner, set only while
    that very process runs (its cgroup known), so that journald attaches
    the owner's name, executable and unit, never a stranger's that got the
    PID; TCPSTATES_OWNER_PID holds it in any case. The on-CPU task has
    fields of its own. No field starts with "_": those belong to journald."""
    ev = as_event(ev)
    v = "IPV4" if ev.family == socket.AF_INET else "IPV6"
    span = ev.flags & SPAN_KNOWN
    who = ("%s[%d]" % (owner[1], owner[0])) if owner else "unknown owner"
    fields = {
        "MESSAGE": "%s: %s \u2192 %s %s \u2192 %s%s%s" % (
            who, endpoint_text(ev.family, ev.laddr, ev.lport),
            endpoint_text(ev.family, ev.raddr, ev.rport),
            state_name(ev.oldstate), state_name(ev.newstate),
            (" after %.3f ms" % (ev.span_us / 1000)) if span else "",
            (": " + reason.phrase) if reason.phrase else ""),
        "MESSAGE_ID": JOURNAL_MESSAGE_ID,
        "PRIORITY": str(LOG_NOTICE),
        "SYSLOG_IDENTIFIER": JOURNAL_IDENTIFIER,
    }
    if owner:
        if owner[3]:
            fields["OBJECT_PID"] = str(owner[0])
        fields["TCPSTATES_OWNER_PID"] = str(owner[0])
        fields["TCPSTATES_OWNER_COMM"] = owner[1]
        fields["TCPSTATES_OWNER_FROM"] = owner[2]
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
    if reason.word:
        fields["TCPSTATES_REASON"] = reason.word
    if reason.errno is not None:
        fields["ERRNO"] = str(reason.errno)         # journald's own field for it
    if reason.retries is not None:
        fields["TCPSTATES_RETRIES"] = str(reason.retries)
    if reason.reset:
        fields["TCPSTATES_RESET_REASON"] = reason.reset
    return fields


def native_entry(fields):
    """A record as one datagram of journald's native protocol
    (systemd.io/JOURNAL_NATIVE_PROTOCOL): a "KEY=value\n" line per field;
    a value holding a newline goes in the binary form instead: the key, a
    newline, the value's length (64-bit little-endian), the value, a
    newline."""
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + _U64.pack(len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def journal_entry_function(clock, owner_of, reasons):
    """A function event tuple -> its record (the fields of journal_fields)
    in the native protocol, the fast way: two bytes %-formats per event,
    made once per address family from constant parts, and every text that
    repeats (addresses, states, names, a close's reason) from bounded
    caches. No dict and no field-by-field work per event. No value can
    hold a newline (names are made terminal-safe first), so every field is
    a plain KEY=value line."""
    def encoded(compute):
        return _Cache(lambda key: compute(key).encode("utf-8", "backslashreplace"))
    a4 = encoded(lambda raw: socket.inet_ntop(socket.AF_INET, raw[:4]))
    a6 = encoded(lambda raw: socket.inet_ntop(socket.AF_INET6, raw))
    st = encoded(state_name)
    cc = encoded(comm_text)
    text = encoded(str)
    af_inet, span_known, tcp_close = socket.AF_INET, SPAN_KNOWN, TCP_CLOSE
    arrow = " \u2192 ".encode()

    def reason_parts(reason):
        # (the MESSAGE's ending, the reason's fields), as journal_fields has them
        ending = (": " + reason.phrase).encode() if reason.phrase else b""
        fields = []
        if reason.word:
            fields.append("TCPSTATES_REASON=%s\n" % reason.word)
        if reason.errno is not None:
            fields.append("ERRNO=%d\n" % reason.errno)
        if reason.retries is not None:
            fields.append("TCPSTATES_RETRIES=%d\n" % reason.retries)
        if reason.reset:
            fields.append("TCPSTATES_RESET_REASON=%s\n" % reason.reset)
        return ending, "".join(fields).encode("utf-8", "backslashreplace")
    closes = reasons.cached(reason_parts)
    no_reason = (b"", b"")

    def formats(v, endpoint):
        # MESSAGE (who, the endpoints, the states[, the span]), the constant
        # fields, the owner's (a %s, made apart), then the rest.
        head = (b"MESSAGE=%s: " + endpoint + arrow + endpoint + b" %s" + arrow + b"%s")
        # (the span's "after", then the reason's ending: %s)
        middle = ("\nMESSAGE_ID=%s\nPRIORITY=%d\nSYSLOG_IDENTIFIER=%s\n" % (
            JOURNAL_MESSAGE_ID, LOG_NOTICE, JOURNAL_IDENTIFIER)).encode() + b"%s"
        body = ("OBJECT_%s_SOURCE_ADDRESS=%%s\nOBJECT_TCP_SOURCE_PORT=%%d\n"
                "OBJECT_%s_DESTINATION_ADDRESS=%%s\nOBJECT_TCP_DESTINATION_PORT=%%d\n"
                "OBJECT_TCP_OLD_STATE=%%s\nOBJECT_TCP_NEW_STATE=%%s\n" % (v, v)).encode()
        tail = ("TCPSTATES_SOCKET=%%x\nTCPSTATES_IP_VERSION=%s\n"
                "TCPSTATES_EVENT_REALTIME_USEC=%%d\nTCPSTATES_EVENT_MONOTONIC_USEC=%%d\n"
                "TCPSTATES_ONCPU_PID=%%d\nTCPSTATES_ONCPU_COMM=%%s\n%%s" % v[-1]).encode()
        with_span = (head + b" after %.3f ms%s" + middle + body + b"OBJECT_TCP_SPAN_TIME=%d\n"
                     + tail)
        return with_span, head + b"%s" + middle + body + tail
    v4 = formats("IPV4", b"%s:%d")
    v6 = formats("IPV6", b"[%s]:%d")
    owned_running = (b"OBJECT_PID=%d\nTCPSTATES_OWNER_PID=%d\nTCPSTATES_OWNER_COMM=%s\n"
                     b"TCPSTATES_OWNER_FROM=%s\n")
    owned = b"TCPSTATES_OWNER_PID=%d\nTCPSTATES_OWNER_COMM=%s\nTCPSTATES_OWNER_FROM=%s\n"

    def entry(ev):
        ts, sk, span, pid, _op, lport, rport, family, old, new, flags, \
            laddr, raddr, comm = ev[:14]
        if family == af_inet:
            la, ra, fmt = a4[laddr], a4[raddr], v4
        else:
            la, ra, fmt = a6[laddr], a6[raddr], v6
        owner = owner_of(ev)
        if owner is None:
            who, mine = b"unknown owner", b""
        else:
            opid, name = owner[0], text[owner[1]]
            who = b"%s[%d]" % (name, opid)
            if owner[3]:
                mine = owned_running % (opid, opid, name, text[owner[2]])
            else:
                mine = owned % (opid, name, text[owner[2]])
        o, n = st[old], st[new]
        ending, why = closes[ev[8:10] + ev[16:20]] if new == tcp_close else no_reason
        real = (ts + clock.wall_minus_mono) // 1000
        if flags & span_known:
            return fmt[0] % (who, la, lport, ra, rport, o, n, span / 1000, ending, mine,
                             la, lport, ra, rport, o, n, span,
                             sk, real, ts // 1000, pid, cc[comm], why)
        return fmt[1] % (who, la, lport, ra, rport, o, n, ending, mine,
                         la, lport, ra, rport, o, n,
                         sk, real, ts // 1000, pid, cc[comm], why)
    return entry


def _bare(exc):
    """An exception like exc without its traceback: kept or raised again
    for every record while journald is away, exc's would keep the frames
    of every failed send alive, with their records."""
    return type(exc)(*exc.args)


class JournalSocket:
    """The sender of -Y: journald's native protocol, one datagram per record,
    on a non-blocking socket connected to JOURNAL_SOCKET. (python-systemd's
    sendv costs a Python string and an iovec per field, and its send blocks
    while journald's queue is full, holding Python's global lock, so that
    the main thread could not read the rings meanwhile.)

    Called with a record: returns True once sent; False when journald's
    socket queue is full (journald is busy, not gone: wait a little and call
    again); raises OSError when journald is not there. Then the socket is
    dropped and connected again on a later call, at most once every
    JOURNAL_RETRY_S, so that a journald started anew is found (under
    systemd the socket outlives a restart of journald, and nothing is
    noticed at all).

    How many records can wait in the kernel for journald is bounded by
    journald's socket queue, net.unix.max_dgram_qlen datagrams (the
    kernel's default, 10, on Debian; systemd's own sysctl.d/50-default.conf
    makes it 512 elsewhere), and by our send buffer, raised to
    JOURNAL_SNDBUF (capped at net.core.wmem_max; SO_SNDBUFFORCE, tried
    first, needs CAP_NET_ADMIN). A blocking send on a full queue would wake
    the sender for every datagram journald takes: instead the caller backs
    off for JOURNAL_BACKOFF_S, and sends the next burst."""

    def __init__(self, path=JOURNAL_SOCKET):
        self.path = path
        self.sock = None
        self.error = None
        self.retry_ns = 0

    def _connect(self):
        now = time.monotonic_ns()
        if self.error is not None and now < self.retry_ns:
            raise _bare(self.error)
        self.retry_ns = now + int(JOURNAL_RETRY_S * 1e9)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            for option in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, JOURNAL_SNDBUF)
                    break
                except OSError:
                    pass
            sock.setblocking(False)
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self.error = _bare(exc)
            raise
        self.error = None
        self.sock = sock
        return sock

    def __call__(self, entry):
        sock = self.sock or self._connect()
        try:
            sock.send(entry)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.close()
            self.error = _bare(exc)
            raise
        return True

    def close(self):
        if self.sock is not None:
            sock, self.sock = self.sock, None
            sock.close()


class JournalWriter:
    """Hands records to a sender thread through a bounded queue, so that
    reading the perf rings never waits on journald.

    The main thread makes each record (journal_entry_function: the owner is
    looked up while the event is fresh) and queues the batch; the thread
    sends them in order, through sender (a JournalSocket; tests pass their
    own: a function of one record that returns False when it could not send
    it yet, anything else once sent, and raises OSError on failure). Every
    event record handed over is sent or counted as not sent (unsent):
      dropped    the queue held JOURNAL_QUEUE records already (journald
                 has fallen behind for seconds): the newest are not queued
      failed     the sender raised (journald is not there): tracing goes
                 on; the first failure is reported once (warning())
      at finish  those still queued when the stop grace ran out
    Loss records (lost()) are queued even when the queue is full, and are
    not counted: they say what the counts are (in the journal; stderr has
    them in any case). The thread runs with the stop signals blocked, so
    that they reach the main thread, which alone handles them."""

    def __init__(self, clock, procs, sender, limit=JOURNAL_QUEUE, reasons=None):
        self.clock = clock
        self.procs = procs
        self.entry = journal_entry_function(clock, procs.owner, reasons or Reasons())
        self.sender = sender
        self.limit = limit
        self.handed = 0             # event records handed over (queued or dropped)
        self.sent = 0               # written by the thread only
        self.failed = 0             # written by the thread only
        self.dropped = 0            # written by the main thread only
        self.error = None           # the first failure, for warning()
        self._warned = False
        self._batches = collections.deque()
        self._queued = 0
        self._closing = False
        self._abort = False
        self._wake = threading.Condition()
        self._thread = None

    @property
    def unsent(self):
        """Records not sent: dropped and failed; from finish() on, also those
        still queued."""
        if self._closing:
            return self.handed - self.sent
        return self.dropped + self.failed

    def start(self):
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        # The thread inherits the signal mask: block the stop signals around
        # its start, and a signal in between waits for the main thread.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def events(self, ready):
        """Queue the records of a batch of events; those that do not fit are
        counted, not made."""
        self.handed += len(ready)
        room = self.limit - self._queued       # only the thread lowers it
        if room < len(ready):
            self.dropped += len(ready) - max(room, 0)
            ready = ready[:max(room, 0)]
        if ready:
            entry = self.entry
            self._put([entry(ev) for ev in ready], True)

    def stuck(self, ev):
        """Queue a --stuck report's record (counted like an event's)."""
        self._one(native_entry(stuck_fields(ev, self.clock, self.procs.owner(ev))))

    def lifecycle(self, life):
        """Queue a --lifecycle row's record (counted like an event's)."""
        self._one(native_entry(lifecycle_fields(life, self.clock)))

    def _one(self, record):
        self.handed += 1
        if self._queued >= self.limit:
            self.dropped += 1
        else:
            self._put([record], True)

    def lost(self, lost, total, gaps=0, gaps_total=0, unsent=0, unsent_total=0):
        self._put([native_entry(lost_fields(lost, total, gaps, gaps_total,
                                            unsent, unsent_total))], False)

    def _put(self, records, counted):
        with self._wake:
            self._batches.append((records, counted))
            self._queued += len(records)
            self._wake.notify()
        if self._thread is None:            # not started (tests): send now
            self._send_queued()

    def _send_queued(self):
        while True:
            with self._wake:
                if not self._batches:
                    return
                batch, counted = self._batches.popleft()
                self._queued -= len(batch)
            self._send(batch, counted)

    def _run(self):
        wake = self._wake
        while True:
            with wake:
                while not self._batches and not self._closing:
                    wake.wait()
                if not self._batches:
                    return
            self._send_queued()
            if self._abort:
                return

    def _send(self, batch, counted):
        send, sleep = self.sender, time.sleep
        for record in batch:
            while not self._abort:
                try:
                    if send(record) is not False:
                        self.sent += counted
                        break
                except OSError as exc:
                    if self.error is None:
                        self.error = _bare(exc)
                    self.failed += counted
                    break
                sleep(JOURNAL_BACKOFF_S)        # journald's queue is full
            else:
                return          # abandoned: finish() counts them

    def warning(self):
        """The first failure, once, as a line for stderr (or None)."""
        if self.error is None or self._warned:
            return None
        self._warned = True
        return ("journal: sending a record failed (%s); tracing goes on, unsent "
                "records are counted" % (self.error.strerror or self.error))

    def finish(self, stop):
        """Let the thread send what is queued, and end it. It may take as long
        as journald keeps taking records; not once it has taken none for
        JOURNAL_STALL_S (stuck, not busy), and after a stop request not past
        its deadline: the records left then are not sent (see unsent)."""
        if self._thread is None:
            self._closing = True
            return
        with self._wake:
            self._closing = True
            self._wake.notify()
        sent, progress = self.sent, time.monotonic()
        while self._thread.is_alive():
            now, deadline = time.monotonic(), stop.deadline
            if self.sent != sent:
                sent, progress = self.sent, now
            if (deadline is not None and now >= deadline) or now - progress >= JOURNAL_STALL_S:
                self.close()
                return
            self._thread.join(WAIT_STEP_MS / 1000)

    def close(self):
        """Stop the thread now (a failed run, or the grace is over): it gives
        up within one back-off. (Were it stuck in a sender that blocks, it
        could still send one record: unsent would be one too many.)"""
        self._closing = True
        if self._thread is None:
            return
        with self._wake:
            self._abort = True
            self._wake.notify()
        self._thread.join(WAIT_STEP_MS / 1000)
        if not self._thread.is_alive():
            getattr(self.sender, "close", lambda: None)()


# -- Output, continued: metrics for Prometheus (--metrics, --metrics-file) --
# This part is kept whole, its constants included (against the house order
# of constants first), so that the metrics read, and merge, as one piece.
# The client library (python3-prometheus-client) is imported only by the
# functions that talk to it: without a metrics option tcpstates neither
# needs nor loads it.
#
# Per event the cost is a few C-level operations: events are counted a whole
# batch at a time (Metrics.add, from Tracer._drain) into plain dicts, and the
# client library's metric objects are built from those dicts only when
# something reads them (a scrape, or the file being rewritten).

# tcpstates_state_duration_seconds' bucket bounds, in microseconds (the
# unit of the kernel's spans): from 100 µs (a loopback handshake) through
# LAN and WAN round trips, to the minutes of idle keep-alives and of the
# FIN_WAIT2 timeout (60 s by default), up to 10 min.
DURATION_BOUNDS_US = (
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
    120_000_000, 300_000_000, 600_000_000)
METRICS_BY_CHOICES = ("lport", "comm")
# --metrics-by: distinct label sets (lport and/or comm values) kept at most;
# later ones are all counted under the value "other".
METRICS_BY_LIMIT = 100
METRICS_OTHER = "other"
METRICS_EPHEMERAL = "ephemeral"     # lport of a client socket (see _lport_label)
METRICS_NO_OWNER = "-"              # comm when the owner is unknown
METRICS_FILE_INTERVAL_S = 5.0       # --metrics-file is rewritten this often
METRICS_DEFAULT_ADDRESS = "127.0.0.1"
# tcpstates_events_lost_total{cause}: the Ledger's losses, and the journal's
LOSS_CAUSES = ("perf_buffer", "kernel_skip", "gap", "not_written", "journal")
# tcpstates_connections_total{result}: what became of a connect() (an active
# open, a socket leaving SYN_SENT): "established", or the close reason's
# word (REASONS) of its SYN_SENT -> CLOSE, or "unknown" where the kernel
# said nothing that decide_reason takes as a reason. These are the words
# decide_reason can give a SYN_SENT -> CLOSE (a reset received there is
# "refused"; reset-by-peer, closed and listener-closed need other states):
# a fixed set, so the series stay few. See connect_results.
CONNECT_RESULTS = ("established", "refused", "timeout", "unreachable", "aborted",
                   "reset-sent", "unknown")
_TCP_ESTABLISHED, _TCP_SYN_SENT, _TCP_CLOSE = 1, 2, 7
# Metrics.add keeps one int per event, folded into the counts in bulk (at
# a scrape, a file write, or when this many are waiting: the sort costs
# least per event at a few thousand, which stay in the CPU's caches).
METRICS_FOLD_AT = 4096
_SPAN_BITS = 48         # a span is below 2**48 us (8.9 years): spans are
_SPAN_MASK = (1 << _SPAN_BITS) - 1      # bounded by the uptime
# Counted in the kernel (see "Metrics" in the BPF program): states 0 to
# METRIC_STATES - 1; the words of its metric_counts map, per CPU.
METRIC_STATES = 32
METRIC_WORDS = METRIC_STATES * METRIC_STATES + METRIC_STATES * (len(DURATION_BOUNDS_US) + 2)


def connect_results(events, reasons):
    """{result: count} of the connect attempts that ended in these events:
    SYN_SENT -> ESTABLISHED is "established", SYN_SENT -> CLOSE its close
    reason's word (reasons: a Reasons), "unknown" without one (a connect
    given up by close(), or a kernel without the tracepoint that would
    have told). A connect's other moves (SYN_SENT -> SYN_RECV, a
    simultaneous open) are not its end. Few events leave SYN_SENT (two of a
    connection's ten): the rest cost one comparison each."""
    results = {}
    for ev in [ev for ev in events if ev[8] == _TCP_SYN_SENT]:
        if ev[9] == _TCP_ESTABLISHED:
            result = "established"
        elif ev[9] == _TCP_CLOSE:
            result = reasons(ev).word
            if result not in CONNECT_RESULTS:
                result = "unknown"
        else:
            continue
        results[result] = results.get(result, 0) + 1
    return results


def metric_counts(words, nbounds=None):
    """The kernel's metric counts (the words of metric_counts, summed over
    CPUs) as Metrics keeps its own: ({(oldstate, newstate): count},
    {(state,): [per bucket..., above the last bound, sum of spans in us]}),
    without the zeros (a pair or state never seen has no series)."""
    nbounds = len(DURATION_BOUNDS_US) if nbounds is None else nbounds
    n, width = METRIC_STATES, nbounds + 2
    transitions = {(index // n, index % n): count
                   for index, count in enumerate(words[:n * n]) if count}
    durations = {}
    for state in range(n):
        entry = list(words[n * n + state * width:n * n + (state + 1) * width])
        if any(entry[:-1]):
            durations[(state,)] = entry
    return transitions, durations


def local_port_range(path="/proc/sys/net/ipv4/ip_local_port_range"):
    """The kernel's ephemeral port range, (low, high)."""
    try:
        with open(path) as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


class Metrics:
    """The counts behind the Prometheus metrics, in plain dicts keyed by
    label values (states as numbers; names are given at collection).

    The tracer's thread calls add() once per batch; a reader's thread (the
    HTTP server's, or the file writer's) calls families(). Both take the
    lock.

    add() does the least it can per event: it makes one int of each event,
    oldstate, newstate, whether the span is known, and the span, packed so
    that ints sort by (oldstate, newstate, known, span), and keeps them.
    _fold() sorts a few thousand of them at a time and finds every count by
    bisection, so that its cost per event is a share of one sort however
    small the batches were (tens of events at a few thousand a second).

    With in_kernel, the transitions and the histogram are the BPF
    program's counts instead (see "Metrics" in it), read from its map by
    the reader given to attach_kernel at every collection, and kept at
    detach_kernel for the collections after the program is gone: add()
    then only counts the events and the connect results (connect_results).

    With `by` ("lport", "comm" or both) the counts are kept per set of
    those label values. The sets are capped at `limit`: events of later
    ones are counted under "other" in each label (one warning says so),
    so that memory and series stay bounded whatever the traffic. A client
    socket's local port is chosen by the kernel: ports in the ephemeral
    range (and 0, in a connect's first event) are labelled "ephemeral"."""

    def __init__(self, by=(), ephemeral=(32768, 60999), limit=METRICS_BY_LIMIT, warn=None,
                 reasons=None, in_kernel=False):
        self.by = tuple(name for name in METRICS_BY_CHOICES if name in by)
        if in_kernel and self.by:
            raise ValueError("the kernel counts without labels")
        self.in_kernel = in_kernel
        self.kernel = None          # in_kernel: () -> (transitions, durations)
        self.reasons = reasons or Reasons()
        self.ephemeral = ephemeral
        self.limit = limit
        self.warn = warn
        self.lock = threading.Lock()
        self.events = 0
        self.pending = {}           # by-labels -> [packed event, ...]
        self.npending = 0
        self.transitions = {}       # by-labels + (oldstate, newstate) -> count
        self.durations = {}         # by-labels + (state,) -> [per bucket..., +Inf, sum_us]
        self.connections = {}       # by-labels + (result,) -> count
        self.lost = dict.fromkeys(LOSS_CAUSES, 0)   # cause -> count: see set_lost
        self.label_sets = set()
        self.overflowed = False
        self.stuck = None           # state -> count, with --stuck (see set_stuck)
        if not self.by:
            # Known before any event: present (at 0) from the first scrape,
            # so that rate() and increase() see the first failure.
            for result in CONNECT_RESULTS:
                self.connections[(result,)] = 0
        low, high = ephemeral
        self._lport = _Cache(lambda port: METRICS_EPHEMERAL if port == 0 or low <= port <= high
                             else str(port), limit=65536)

    # -- counting, in the tracer's thread ---------------------------------
    def add(self, events):
        """Count a batch of event tuples (Event's field order)."""
        if not events:
            return
        if self.in_kernel:
            results = connect_results(events, self.reasons)
            with self.lock:
                self.events += len(events)
                self._add_results((), results)
            return
        groups = self._grouped(events) if self.by else (((), events),)
        results = [(labels, connect_results(batch, self.reasons)) for labels, batch in groups]
        packed = [(labels, [((ev[8] << 16 | ev[9]) << 1 | ev[10] & SPAN_KNOWN) << _SPAN_BITS
                            | ev[2] for ev in batch])
                  for labels, batch in groups]
        with self.lock:
            for labels, keys in packed:
                kept = self.pending.get(labels)
                if kept is None:
                    self.pending[labels] = keys
                else:
                    kept.extend(keys)
            self.events += len(events)
            self.npending += len(events)
            for labels, counts in results:
                self._add_results(labels, counts)
            if self.npending >= METRICS_FOLD_AT:
                self._fold()

    def _add_results(self, labels, results):
        counts = self.connections
        for result, n in results.items():
            key = labels + (result,)
            counts[key] = counts.get(key, 0) + n

    def attach_kernel(self, reader):
        """in_kernel: read the program's counts with reader from now on."""
        with self.lock:
            self.kernel = reader

    def detach_kernel(self):
        """Keep the program's last counts, before it is closed (a scrape
        or file write in progress ends first: it holds the lock). If the
        map cannot be read now, the counts of the last reading stay."""
        with self.lock:
            if self.kernel is not None:
                try:
                    self.transitions, self.durations = self.kernel()
                except OSError as exc:
                    if self.warn:
                        self.warn("metrics: the kernel's last counts could not be read (%s); "
                                  "the last scrape's stay" % (exc.strerror or exc))
                self.kernel = None

    def _fold(self):
        """Count what add() kept (the lock held)."""
        pending, self.pending, self.npending = self.pending, {}, 0
        nbounds = len(DURATION_BOUNDS_US)
        for labels, packed in pending.items():
            packed.sort()
            transitions = {}
            start, end = 0, len(packed)
            while start < end:
                # one run of equal (oldstate, newstate, known)
                head = packed[start] >> _SPAN_BITS
                base = head << _SPAN_BITS
                stop = bisect.bisect_left(packed, (head + 1) << _SPAN_BITS, start)
                pair = (head >> 17, (head >> 1) & 0xffff)
                transitions[pair] = transitions.get(pair, 0) + stop - start
                if head & 1:                    # spans known: the histogram
                    key = labels + pair[:1]
                    entry = self.durations.get(key)
                    if entry is None:
                        entry = self.durations[key] = [0] * (nbounds + 2)
                    below = start
                    for index, bound in enumerate(DURATION_BOUNDS_US):
                        at = bisect.bisect_right(packed, base | bound, below, stop)
                        entry[index] += at - below
                        below = at
                    entry[nbounds] += stop - below
                    entry[nbounds + 1] += sum(packed[start:stop]) - (stop - start) * base
                start = stop
            counts = self.transitions
            for pair, n in transitions.items():
                key = labels + pair
                counts[key] = counts.get(key, 0) + n

    def _grouped(self, events):
        """[(label values, events)] for --metrics-by, with the cap applied."""
        lport, comm = "lport" in self.by, "comm" in self.by
        ports, names = self._lport, COMM_TEXTS
        groups = {}
        for ev in events:
            if lport and comm:
                key = (ports[ev[5]], names[ev[14]] if ev[10] & OWNER_KNOWN else METRICS_NO_OWNER)
            elif lport:
                key = (ports[ev[5]],)
            else:
                key = (names[ev[14]] if ev[10] & OWNER_KNOWN else METRICS_NO_OWNER,)
            group = groups.get(key)
            if group is None:
                group = groups[key] = []
            group.append(ev)
        capped = {}
        for key, group in groups.items():
            if key not in self.label_sets:
                if len(self.label_sets) < self.limit:
                    self.label_sets.add(key)
                else:
                    if not self.overflowed and self.warn is not None:
                        self.warn("metrics: more than %d label sets of --metrics-by %s; "
                                  "the rest are counted as \"%s\""
                                  % (self.limit, ",".join(self.by), METRICS_OTHER))
                    self.overflowed = True
                    key = (METRICS_OTHER,) * len(self.by)
            capped.setdefault(key, []).extend(group)
        return list(capped.items())

    def set_stuck(self, counts):
        """--stuck: the sockets in view stuck now, {state: count}, as the
        last check of the sockets map found them."""
        with self.lock:
            self.stuck = dict(counts)

    def set_lost(self, **causes):
        """The loss ledger's running totals (cause=count; None where the
        count is not known on this kernel, which leaves that series out)."""
        with self.lock:
            for cause, count in causes.items():
                if count is None:
                    self.lost.pop(cause, None)
                else:
                    self.lost[cause] = count

    # -- collection, in a reader's thread ---------------------------------
    def families(self):
        """The metric families, as the client library's objects (which it
        imports). Also a Prometheus "custom collector": see collect()."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        with self.lock:
            self._fold()
            stuck = None if self.stuck is None else dict(self.stuck)
            events = self.events
            if self.kernel is not None:
                # kept: the counts at the end if the map is gone by then
                transitions, durations = self.transitions, self.durations = self.kernel()
            else:
                transitions = dict(self.transitions)
                durations = {key: list(entry) for key, entry in self.durations.items()}
            connections = dict(self.connections)
            lost = dict(self.lost)
        by = list(self.by)
        n = len(by)
        family = CounterMetricFamily(
            "tcpstates_transitions",
            "TCP state changes seen, by old and new state.",
            labels=by + ["from", "to"])
        for key in sorted(transitions):
            family.add_metric(list(key[:n]) + [state_name(key[n]), state_name(key[n + 1])],
                              transitions[key])
        yield family
        family = HistogramMetricFamily(
            "tcpstates_state_duration_seconds",
            "Time TCP sockets spent in a state, observed when they left it "
            "(spans the tracer knows only).",
            labels=by + ["state"])
        for key in sorted(durations):
            entry = durations[key]
            buckets, total = [], 0
            for bound, count in zip(DURATION_BOUNDS_US, entry):
                total += count
                buckets.append(("%g" % (bound / 1e6), total))
            buckets.append(("+Inf", total + entry[len(DURATION_BOUNDS_US)]))
            family.add_metric(list(key[:n]) + [state_name(key[n])], buckets,
                              sum_value=entry[-1] / 1e6)
        yield family
        family = CounterMetricFamily(
            "tcpstates_connections",
            "Outgoing connection attempts (connect) that ended, by result: "
            "established, or the close reason of a failed one (refused, timeout, "
            "unreachable, aborted, reset-sent), or unknown when the kernel gave "
            "none (a connect given up by close(), or a reason's tracepoint missing).",
            labels=by + ["result"])
        for key in sorted(connections):
            family.add_metric(list(key), connections[key])
        yield family
        family = CounterMetricFamily(
            "tcpstates_events",
            "State-change events that reached the tracer.")
        family.add_metric([], events)
        yield family
        family = CounterMetricFamily(
            "tcpstates_events_lost",
            "Events lost or found missing, by cause (see LOSS ACCOUNTING in "
            "tcpstates(8)).",
            labels=["cause"])
        for cause in LOSS_CAUSES:
            if cause in lost:
                family.add_metric([cause], lost[cause])
        yield family
        if stuck is not None:
            family = GaugeMetricFamily(
                "tcpstates_stuck_sockets",
                "Sockets in a state for at least --stuck seconds now, by state "
                "(the states --stuck watches, 0 included).",
                labels=["state"])
            for state in sorted(stuck):
                family.add_metric([state_name(state)], stuck[state])
            yield family

    def collect(self):
        return self.families()


def import_prometheus_client(args):
    """The client library's registry and exposition parts, or a one-line
    Fatal naming the option that needs them."""
    try:
        import prometheus_client
        import prometheus_client.exposition  # noqa: F401 (make_wsgi_app, generate_latest)
    except ImportError:
        option = "--metrics" if args.metrics else "--metrics-file"
        raise Fatal("%s needs the Prometheus client library; install "
                    "python3-prometheus-client and run tcpstates with /usr/bin/python3"
                    % option) from None
    return prometheus_client


class MetricsExporter:
    """Publishes a Metrics: over HTTP on --metrics [ADDR:]PORT (every path
    answers with the metrics), and into the --metrics-file PATH, rewritten
    atomically every METRICS_FILE_INTERVAL_S seconds and once more at exit.

    The HTTP answer also carries the client library's process_* metrics
    (the tracer's own CPU time, memory, open files); the file does not:
    node_exporter's textfile collector would refuse process_* series, which
    node_exporter exports for itself. start() binds and writes before the
    program is attached, so that a port in use or an unwritable path ends
    the run before it starts (Fatal)."""

    def __init__(self, args, metrics, warn):
        self.args = args
        self.metrics = metrics
        self.warn = warn
        self.server = None
        self.writer = None
        self.stopping = threading.Event()
        self.file_failed = False

    def start(self):
        client = import_prometheus_client(self.args)
        if self.args.metrics:
            registry = client.CollectorRegistry(auto_describe=False)
            registry.register(self.metrics)
            client.ProcessCollector(registry=registry)
            self.server = self._serve(registry, *self.args.metrics)
        if self.args.metrics_file:
            self.file_registry = client.CollectorRegistry(auto_describe=False)
            self.file_registry.register(self.metrics)
            error = self.write_file()
            if error:
                self.close()
                raise Fatal("--metrics-file: cannot write %s: %s"
                            % (safe_text(self.args.metrics_file), error))
            self.writer = threading.Thread(target=self._write_every, name="metrics-file",
                                           daemon=True)
            self.writer.start()

    def _serve(self, registry, host, port):
        import socketserver
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
        from prometheus_client.exposition import make_wsgi_app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            address_family = family
            daemon_threads = True

            def server_bind(self):
                # HTTPServer's would look the address up in DNS (getfqdn):
                # seconds lost on a host whose resolver does not answer.
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = host, port
                self.setup_environ()

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, *_args):
                pass        # no line on stderr per scrape

        try:
            server = make_server(host, port, make_wsgi_app(registry), Server, QuietHandler)
        except OSError as exc:
            where = "[%s]:%d" % (host, port) if family == socket.AF_INET6 else "%s:%d" % (host, port)
            raise Fatal("--metrics: cannot listen on %s: %s"
                        % (where, exc.strerror or exc)) from None
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                  name="metrics-http", daemon=True)
        thread.start()
        return server

    def write_file(self):
        """Write the metrics to the file through a temporary file in the
        same directory and a rename, so that a reader sees the old text or
        the new one, never part of either. The temporary name ends in .tmp
        (node_exporter reads *.prom only). Returns None, or the error."""
        from prometheus_client.exposition import generate_latest
        import tempfile
        path = self.args.metrics_file
        directory, name = os.path.split(os.path.abspath(path))
        try:
            data = generate_latest(self.file_registry)
            fd, temp = tempfile.mkstemp(dir=directory, prefix="." + name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    # readable by node_exporter's user, whatever the umask
                    os.fchmod(f.fileno(), 0o644)
                    f.write(data)
                os.replace(temp, path)
            except BaseException:
                os.unlink(temp)
                raise
        except OSError as exc:
            return exc.strerror or str(exc)
        return None

    def _write_every(self):
        while not self.stopping.wait(METRICS_FILE_INTERVAL_S):
            self._write_or_warn()

    def _write_or_warn(self):
        error = self.write_file()
        if error and not self.file_failed:
            self.warn("--metrics-file: writing %s failed (%s); trying again every %g s"
                      % (safe_text(self.args.metrics_file), error, METRICS_FILE_INTERVAL_S))
        self.file_failed = bool(error)

    def close(self):
        """Stop serving; write the file a last time, with the final counts."""
        self.stopping.set()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.join()
            self._write_or_warn()
        if self.server is not None:
            server, self.server = self.server, None
            server.shutdown()
            server.server_close()


# ---------------------------------------------------------------------------
# 5. The kernel: checks before any compile work (each failure its own
# message), facts probed once, the program's configuration, perf rings.
# ---------------------------------------------------------------------------
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


class KernelFacts(collections.namedtuple(
        "KernelFacts", ("destroy_hook", "reset_in", "reset_out", "rst_reason", "rst_enum",
                        "error_report", "retransmit", "synack"),
        defaults=(False,) * 7)):
    """What the running kernel offers beyond the required tracepoint, probed
    once (probe_kernel) and handed to bpf_cflags: which optional tracepoints
    exist, and whether tcp_send_reset names its reason (Linux 6.10+), as an
    enum type that BCC needs declared."""


# The reasons' hooks: (fact, tracepoint, C function, what is unknown without it).
REASON_HOOKS = (
    ("reset_in", RESET_IN_TRACEPOINT, "on_reset_in",
     "reset-by-peer is unknown; refused only where the kernel reports errno 111"),
    ("reset_out", RESET_OUT_TRACEPOINT, "on_reset_out",
     "reset-sent is unknown; aborted only where the kernel reports errno 103"),
    ("error_report", ERROR_TRACEPOINT, "on_error",
     "timeout and unreachable are unknown, and no errno is shown"),
    ("retransmit", RETRANSMIT_TRACEPOINT, "on_retransmit",
     "timeouts have no retry count, and LAST_ACK/CLOSING -> CLOSE is never shown closed"),
    ("synack", SYNACK_TRACEPOINT, "on_synack",
     "a fast-open child's timeout has no retry count"),
)


def tracepoint_format(name):
    """The text of a tracepoint's format file, or "" if unreadable."""
    try:
        with open(os.path.join(find_tracefs() or "", "events", *name.split(":"),
                               "format")) as f:
            return f.read()
    except OSError:
        return ""


def probe_kernel():
    reset_format = tracepoint_format(RESET_OUT_TRACEPOINT)
    return KernelFacts(
        destroy_hook=tracepoint_exists(DESTROY_TRACEPOINT),
        reset_in=tracepoint_exists(RESET_IN_TRACEPOINT),
        reset_out=tracepoint_exists(RESET_OUT_TRACEPOINT),
        rst_reason=bool(re.search(r"field:[^;]* reason;", reset_format)),
        rst_enum="enum sk_rst_reason reason;" in reset_format,
        error_report=tracepoint_exists(ERROR_TRACEPOINT),
        retransmit=tracepoint_exists(RETRANSMIT_TRACEPOINT),
        synack=tracepoint_exists(SYNACK_TRACEPOINT))


def parse_reset_reasons(format_text):
    """{number: name} of the kernel's reset reasons, from the print format of
    tcp:tcp_send_reset ("__print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" },
    ..."). The numbers change between kernel versions; the names do not."""
    m = re.search(r"__print_symbolic\(REC->reason,([^)]*)\)", format_text)
    if not m:
        return {}
    return {int(n): name for n, name in re.findall(r'\{\s*(\d+),\s*"(\w+)"\s*\}', m.group(1))}


_RESET_NAMES = []


def reset_reason_names():
    """This kernel's reset reasons by number (read once; {} when unknown)."""
    if not _RESET_NAMES:
        _RESET_NAMES.append(parse_reset_reasons(tracepoint_format(RESET_OUT_TRACEPOINT)))
    return _RESET_NAMES[0]


def reasons_wanted(args):
    """Whether the program learns reasons: the output shows them (REASON
    with -x, -j, -Y, --reason), or the metrics count failed connects by
    them (tcpstates_connections_total)."""
    return bool(args.extended or args.json or args.journal or args.reasons
                or args.metrics or args.metrics_file)


def metrics_in_kernel(args):
    """Whether the BPF program counts the metrics' transitions and
    histogram (WITH_METRICS), user space reading its map: with a metrics
    option, unless user space must count them itself, because it labels
    each event (--metrics-by), drops events the kernel sends (--reason
    decides some reasons in user space), or stops at a number of rows
    (--count: the kernel would go on counting until the detach)."""
    return bool((args.metrics or args.metrics_file) and not args.metrics_by
                and not args.reasons and args.count is None)


def state_mask(numbers):
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


def port_bitmap(ports):
    """The 1024 64-bit words of a port set, as the BPF program reads them."""
    words = [0] * 1024
    for port in ports:
        words[port >> 6] |= 1 << (port & 63)
    return words


def bpf_cflags(args, facts=KernelFacts(destroy_hook=False)):
    """The -D defines that configure the BPF program for these options, on
    a kernel with these facts. Pure: it reads nothing of the host."""
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
    if args.max_sockets:
        flags.append("-DMAX_SOCKETS=%d" % args.max_sockets)
    if args.test_skip:
        flags.append("-DTEST_SKIP_NEWSTATE=%d" % args.test_skip[0])
    if facts.destroy_hook:
        flags.append("-DHAVE_TCP_DESTROY_SOCK=1")
    if metrics_in_kernel(args):
        flags.append("-DWITH_METRICS=1")
        flags.append("-DMETRIC_BUCKETS=%d" % len(DURATION_BOUNDS_US))
    if reasons_wanted(args):
        flags.append("-DWITH_REASONS=1")
        # facts this long before or after a move to CLOSE are another
        # context's: the reorder margin, which also bounds how late a fact
        # can be merged into its row
        flags.append("-DREASON_WINDOW_NS=%dULL" % REORDER_MARGIN_NS)
        if args.reasons:
            words = list(REASONS)
            flags.append("-DFILTER_REASONS=0x%xU" % sum(1 << words.index(w) for w in args.reasons))
            flags.append("-DREASON_BIT_REFUSED=0x%xU" % (1 << words.index("refused")))
            flags.append("-DREASON_BIT_LISTENER_CLOSED=0x%xU"
                         % (1 << words.index("listener-closed")))
        for fact, _tracepoint, function, _lost in REASON_HOOKS:
            if getattr(facts, fact):
                flags.append("-DHAVE_%s=1" % function[3:].upper())
        if facts.reset_out and facts.rst_reason:
            flags.append("-DHAVE_RST_REASON=1")
            if facts.rst_enum:
                flags.append("-DHAVE_RST_ENUM=1")
    elif stuck_port_hook(args, facts):
        flags.append("-DHAVE_RETRANSMIT=1")
    return flags


def stuck_port_hook(args, facts):
    """Whether --stuck alone (without the reasons, which have it anyway)
    attaches the retransmit hook, for a connecting socket's local port (see
    on_retransmit)."""
    return bool(args.stuck and facts.retransmit and not reasons_wanted(args))


def bpf_hooks(args, facts):
    """(C function, tracepoint) of every hook to load and attach, the main
    one first."""
    hooks = [("on_set_state", TRACEPOINT)]
    if facts.destroy_hook:
        hooks.append(("on_destroy", DESTROY_TRACEPOINT))
    if reasons_wanted(args):
        hooks += [(function, tracepoint) for fact, tracepoint, function, _lost in REASON_HOOKS
                  if getattr(facts, fact)]
    elif stuck_port_hook(args, facts):
        hooks.append(("on_retransmit", RETRANSMIT_TRACEPOINT))
    return hooks


def reason_notes(args, facts):
    """What --ebpf says of the reasons on this kernel: one line per missing
    tracepoint and what its absence leaves unknown."""
    if not reasons_wanted(args):
        return ["// reasons: off (shown with -x, -j, -Y or --reason, counted with "
                "--metrics or --metrics-file)"]
    notes = []
    for fact, tracepoint, _function, lost in REASON_HOOKS:
        if not getattr(facts, fact):
            notes.append("// reasons: no %s tracepoint on this kernel: %s" % (tracepoint, lost))
    if facts.reset_out and not facts.rst_reason:
        notes.append("// reasons: %s gives no reset reason (Linux 6.10+): reset-sent has no "
                     "detail, and aborted only comes from errno 103" % RESET_OUT_TRACEPOINT)
    return notes or ["// reasons: every tracepoint they use is present"]


def ebpf_listing(args):
    """What --ebpf prints: the cflags, the port maps' contents, the program."""
    facts = probe_kernel()
    lines = ["// cflags: %s" % (" ".join(bpf_cflags(args, facts)) or "(none)")]
    lines += reason_notes(args, facts)
    if args.localport:
        lines.append("// local_ports map: %s" % ",".join(map(str, args.localport)))
    if args.remoteport:
        lines.append("// remote_ports map: %s" % ",".join(map(str, args.remoteport)))
    return "\n".join(lines) + "\n" + BPF_PROGRAM


def proc_net_tcp(proc="/proc"):
    """(namespace, family, fields) for every line of /proc/PID/net/tcp and
    tcp6, read for one process per network namespace that a process is in
    (the file shows the namespace of PID): every namespace, once."""
    seen = set()
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        pids = []
    for pid in ["self"] + pids:
        try:
            namespace = os.readlink("%s/%s/ns/net" % (proc, pid))
        except OSError:
            continue
        if namespace in seen:
            continue
        seen.add(namespace)
        for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
            try:
                with open("%s/%s/net/%s" % (proc, pid, name)) as f:
                    next(f, None)
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                yield namespace, family, line.split()


def existing_listeners(proc="/proc"):
    """{(family, port): count} of the listening TCP sockets in every network
    namespace that a process is in.

    The tracepoint cannot tell namespaces apart, so a listener in a
    container that predates the tracer must still make its port ambiguous
    when the host listens on the same port later."""
    found = collections.Counter()
    for _namespace, family, parts in proc_net_tcp(proc):
        try:
            if len(parts) > 3 and int(parts[3], 16) == TCP_LISTEN:
                found[(family, int(parts[1].rsplit(":", 1)[1], 16))] += 1
        except ValueError:
            continue
    return dict(found)


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


# -- the program in the kernel, without BCC's compiler ---------------------
# BCC compiles with clang inside libbcc.so (about 0.4 s of CPU and 140 MB
# here, 74 MB of it for loading the library at all). What it produces is
# kept: the instructions, the table of maps, and which instructions load
# which map. From that description Program makes the maps, loads and
# attaches the functions through libbcc_bpf.so.0, BCC's small C library
# (libbpf, no LLVM). Cold and warm runs both go through Program: from the
# load on they are the same code.
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_PERCPU_MAP_TYPES = (5, 6, 10)       # percpu hash, percpu array, lru percpu hash
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_INSN = struct.Struct("<BBhi")       # code, dst:4 | src:4, off, imm
BPF_LD_IMM64 = 0x18                     # takes two instruction slots
BPF_CALL = 0x85
BPF_PSEUDO_MAP_FD = 1                   # src_reg of a map load by fd
BPF_PSEUDO_KFUNC_CALL = 2
VERIFIER_LOG_SIZE = 1 << 20
CACHE_FORMAT = 1                        # of the saved description
CACHE_DIR = "/var/cache/tcpstates"
CACHE_KEEP = 32                         # entries kept; older ones are removed


class ProgramError(Exception):
    """A saved program that cannot be used on this machine."""


_LIBBPF = []


def libbpf():
    """libbcc_bpf.so.0 with the signatures used here (BCC's libbpf.h)."""
    if _LIBBPF:
        return _LIBBPF[0]
    try:
        lib = ctypes.CDLL("libbcc_bpf.so.0", use_errno=True)
    except OSError:
        raise Fatal("BCC's library libbcc_bpf.so.0 is missing; install python3-bpfcc") from None
    i, u, s, p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_void_p
    for name, restype, argtypes in (
            ("bcc_create_map", i, [i, s, i, i, i, i]),
            ("bcc_prog_load", i, [i, s, p, i, s, u, i, p, u]),
            ("bpf_attach_tracepoint", i, [i, s, s]),
            ("bpf_close_perf_event_fd", i, [i]),
            ("bpf_update_elem", i, [i, p, p, ctypes.c_ulonglong]),
            ("bpf_lookup_elem", i, [i, p, p]),
            ("bpf_get_next_key", i, [i, p, p]),
            ("bpf_lookup_batch", i, [i, p, p, p, p, p]),
            ("bpf_obj_get_info", i, [i, p, ctypes.POINTER(ctypes.c_uint32)]),
            ("bpf_open_perf_buffer_opts", p, [p, p, p, i, p]),
            ("perf_reader_poll", i, [i, p, i]),
            ("perf_reader_consume", i, [i, p]),
            ("perf_reader_fd", i, [p]),
            ("perf_reader_free", None, [p])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    _LIBBPF.append(lib)
    return lib


errno_ENOENT, errno_EINVAL, errno_ENOTSUPP, errno_EOPNOTSUPP = 2, 22, 524, 95


def _errno_text(what):
    return "%s: %s" % (what, os.strerror(ctypes.get_errno()))


def cpu_list(path):
    """CPU numbers from a sysfs list such as "0-3,8"."""
    with open(path) as f:
        text = f.read().strip()
    cpus = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def compile_program(cflags, hooks):
    """Compile BPF_PROGRAM with BCC and describe the result for Program:
    {"maps": {name: {type, key_size, value_size, max_entries, flags}},
     "functions": [{name, tracepoint, license, kern_version, insns (base64),
     relocs {index: map name}}]}. BCC's own maps are dropped afterwards."""
    bcc = import_bcc()
    with _StderrCapture() as capture:
        try:
            bpf = bcc.BPF(text=BPF_PROGRAM.encode(), cflags=cflags)
        except Exception:
            bpf = None
    if bpf is None:
        detail = capture.first_error()
        raise Fatal("compiling the BPF program failed%s; check that the kernel headers "
                    "match (see setup.sh)" % (": " + detail if detail else ""))
    try:
        return describe_program(bpf, hooks)
    finally:
        bpf.cleanup()


def describe_program(bpf, hooks):
    from bcc.libbcc import lib
    z, vp = ctypes.c_size_t, ctypes.c_void_p
    for name, restype in (("bpf_num_tables", z), ("bpf_table_name", ctypes.c_char_p),
                          ("bpf_table_fd_id", ctypes.c_int), ("bpf_table_type_id", ctypes.c_int),
                          ("bpf_table_key_size_id", z), ("bpf_table_leaf_size_id", z),
                          ("bpf_table_max_entries_id", z), ("bpf_table_flags_id", ctypes.c_int),
                          ("bpf_module_license", ctypes.c_char_p),
                          ("bpf_module_kern_version", ctypes.c_uint)):
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = [vp] if name.startswith(("bpf_num", "bpf_module")) \
            else [vp, z]
    module = bpf.module
    maps, by_fd = {}, {}
    for index in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, index).decode()
        maps[name] = {"type": lib.bpf_table_type_id(module, index),
                      "key_size": lib.bpf_table_key_size_id(module, index),
                      "value_size": lib.bpf_table_leaf_size_id(module, index),
                      "max_entries": lib.bpf_table_max_entries_id(module, index),
                      "flags": lib.bpf_table_flags_id(module, index)}
        by_fd[lib.bpf_table_fd_id(module, index)] = name
    functions = []
    for name, tracepoint in hooks:
        code = bytearray(bpf.dump_func(name.encode()))
        relocs = map_loads(code, by_fd)
        for index in relocs:                # no fd of this process in the copy
            struct.pack_into("<i", code, index * BPF_INSN.size + 4, 0)
        functions.append({
            "name": name, "tracepoint": tracepoint,
            # BCC passes the module's licence ("GPL": the program calls
            # GPL-only helpers) and the kernel version of the headers it
            # compiled against, which the kernel ignores since 5.0.
            "license": lib.bpf_module_license(module).decode(),
            "kern_version": lib.bpf_module_kern_version(module),
            "insns": base64.b64encode(bytes(code)).decode("ascii"),
            "relocs": {str(index): map_name for index, map_name in relocs.items()}})
    return {"maps": maps, "functions": functions}


def map_loads(code, by_fd):
    """{instruction index: map name} of every map load by fd; anything else
    that ties the code to this process or to BTF is refused."""
    relocs = {}
    index, count = 0, len(code) // BPF_INSN.size
    while index < count:
        op, regs, _off, imm = BPF_INSN.unpack_from(code, index * BPF_INSN.size)
        if op == BPF_LD_IMM64:
            if regs >> 4 == BPF_PSEUDO_MAP_FD and imm in by_fd:
                relocs[index] = by_fd[imm]
            elif regs >> 4:
                raise Fatal("the compiled program has a load the cache cannot "
                            "replay (instruction %d)" % index)
            index += 2
            continue
        if op == BPF_CALL and regs >> 4 == BPF_PSEUDO_KFUNC_CALL:
            raise Fatal("the compiled program calls a kernel function the cache "
                        "cannot replay (instruction %d)" % index)
        index += 1
    return relocs


class Program:
    """The program in the kernel, made from a description (compile_program's,
    or the cache's): maps created, functions loaded, attached by hand once
    the maps are filled and the perf rings open. Raises ProgramError when
    the description does not fit this machine (the kernel's verifier checks
    every instruction again); nothing is left open then."""

    def __init__(self, saved):
        self.lib = libbpf()
        self.maps, self.info, self.fds, self.links = {}, {}, [], []
        self.hooks = []
        self.ncpus = len(cpu_list("/sys/devices/system/cpu/possible"))
        try:
            for name, info in saved["maps"].items():
                self._create_map(name, dict(info))
            for function in saved["functions"]:
                self._load(function)
        except (KeyError, ValueError, TypeError) as exc:
            self.close()
            raise ProgramError("malformed description: %s" % exc) from None
        except BaseException:
            self.close()
            raise
        self.prog_fd = self.hooks[0][0]

    def _create_map(self, name, info):
        if info["type"] == BPF_MAP_TYPE_PERF_EVENT_ARRAY:
            # one slot per possible CPU of this machine
            info["max_entries"] = max(cpu_list("/sys/devices/system/cpu/possible")) + 1
        fd = self.lib.bcc_create_map(info["type"], name[:15].encode(), info["key_size"],
                                     info["value_size"], info["max_entries"], info["flags"])
        if fd < 0:
            raise ProgramError(_errno_text("creating map %s" % name))
        self.maps[name], self.info[name] = fd, info
        self.fds.append(fd)

    def _load(self, function):
        code = bytearray(base64.b64decode(function["insns"], validate=True))
        for index, name in function["relocs"].items():
            offset = int(index) * BPF_INSN.size
            if code[offset] != BPF_LD_IMM64 or code[offset + 1] >> 4 != BPF_PSEUDO_MAP_FD:
                raise ProgramError("instruction %s is no map load" % index)
            struct.pack_into("<i", code, offset + 4, self.maps[name])
        log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
        insns = (ctypes.c_char * len(code)).from_buffer(code)
        # On a refusal libbcc_bpf loads again to fill the log, and prints it:
        # the log's last line is the reason, and the only line shown.
        with _StderrCapture():
            fd = self.lib.bcc_prog_load(BPF_PROG_TYPE_TRACEPOINT, function["name"][:15].encode(),
                                        insns, len(code), function["license"].encode(),
                                        function["kern_version"], 0, log, VERIFIER_LOG_SIZE)
        if fd < 0:
            err = os.strerror(ctypes.get_errno())
            reason = [line for line in log.value.decode("utf-8", "replace").splitlines()
                      if line.strip() and not line.startswith(("processed ", "verification"))]
            raise ProgramError("the kernel refused %s: %s%s" % (
                function["name"], err, (": " + reason[-1][:200]) if reason else ""))
        self.fds.append(fd)
        self.hooks.append((fd, function["tracepoint"]))

    def attach(self):
        for fd, tracepoint in self.hooks:
            category, event = tracepoint.split(":")
            link = self.lib.bpf_attach_tracepoint(fd, category.encode(), event.encode())
            if link < 0:
                raise OSError(ctypes.get_errno(), _errno_text("attaching to " + tracepoint))
            self.links.append(link)

    def detach(self):
        """The last attached first: the destroy hook goes before the main
        program, else it would count every later close as a gap."""
        while self.links:
            self.lib.bpf_close_perf_event_fd(self.links.pop())

    def update(self, name, key, value):
        if self.lib.bpf_update_elem(self.maps[name], key, value, 0) != 0:
            raise OSError(ctypes.get_errno(), _errno_text("updating map " + name))

    def iterate(self, name, key_size, value_size, batch=4096):
        """Every (key, value) of a hash map, as bytes: in batches of one
        system call each where the kernel has them (Linux 5.6), else one
        key at a time. A read from user space does not count as a use for
        an LRU map, so reading never changes what it evicts."""
        fd, lib = self.maps[name], self.lib
        # the map's own value size: the caller's struct may be a prefix of
        # it (an optional part of the program appends fields)
        value_size = max(value_size, self.info[name]["value_size"])
        if getattr(self, "_batch_ok", True):
            keys = ctypes.create_string_buffer(key_size * batch)
            values = ctypes.create_string_buffer(value_size * batch)
            token, next_token = ctypes.c_uint32(), ctypes.c_uint32()
            first = True
            while True:
                count = ctypes.c_uint32(batch)
                rc = lib.bpf_lookup_batch(fd, None if first else ctypes.byref(token),
                                          ctypes.byref(next_token), keys, values,
                                          ctypes.byref(count))
                err = ctypes.get_errno() if rc != 0 else 0
                if rc != 0 and err != errno_ENOENT:
                    if first and err in (errno_EINVAL, errno_ENOTSUPP, errno_EOPNOTSUPP):
                        self._batch_ok = False      # an older kernel: one by one
                        break
                    raise OSError(err, _errno_text("reading map " + name))
                kraw, vraw = keys.raw, values.raw
                for i in range(count.value):
                    yield (kraw[i * key_size:(i + 1) * key_size],
                           vraw[i * value_size:(i + 1) * value_size])
                if rc != 0:
                    return                          # ENOENT: that was the last
                token.value, first = next_token.value, False
        key = ctypes.create_string_buffer(key_size)
        next_key = ctypes.create_string_buffer(key_size)
        value = ctypes.create_string_buffer(value_size)
        start = None
        while lib.bpf_get_next_key(fd, start, next_key) == 0:
            ctypes.memmove(key, next_key, key_size)
            start = key
            if lib.bpf_lookup_elem(fd, key, value) == 0:    # (it may be gone)
                yield key.raw, value.raw

    def percpu_words(self, name):
        """The u64 words of a per-CPU array's first value, summed over CPUs."""
        size = self.info[name]["value_size"]
        stride = (size + 7) // 8 * 8
        value = ctypes.create_string_buffer(stride * self.ncpus)
        if self.lib.bpf_lookup_elem(self.maps[name], struct.pack("<I", 0), value) != 0:
            raise OSError(ctypes.get_errno(), _errno_text("reading map " + name))
        words = struct.Struct("<%dQ" % (size // 8))
        raw = value.raw
        return [sum(column) for column in zip(*(words.unpack_from(raw, cpu * stride)
                                                for cpu in range(self.ncpus)))]

    def percpu_sum(self, name, index):
        """The sum over CPUs of a per-CPU array's u64 at index."""
        value = ctypes.create_string_buffer(8 * self.ncpus)
        key = struct.pack("<I", index)
        if self.lib.bpf_lookup_elem(self.maps[name], key, value) != 0:
            return 0
        return sum(struct.unpack("<%dQ" % self.ncpus, value.raw))

    def close(self):
        self.detach()
        while self.fds:
            os.close(self.fds.pop())


def bcc_version():
    """BCC's version, read without importing it (that would load LLVM)."""
    import importlib.util
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.origin:
        return ""
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            return f.read().strip()
    except OSError:
        return ""


def sha256_hex(data):
    # CPython's own SHA-256 where it has it: hashlib would load OpenSSL,
    # 5 ms of a warm start's 0.1 s.
    try:
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    return sha256(data).hexdigest()


def cache_key(cflags, hooks, *, bcc=None, release=None, formats=None, cpus=None):
    """The name of a compiled program in the cache: a hash of everything its
    instructions depend on. The keyword arguments are for tests; by default
    each is read from this machine."""
    if formats is None:
        formats = {}
        for _name, tracepoint in hooks:
            try:
                with open(os.path.join(find_tracefs() or "", "events",
                                       *tracepoint.split(":"), "format")) as f:
                    formats[tracepoint] = f.read()
            except OSError:
                formats[tracepoint] = ""
    parts = {
        "cache_format": CACHE_FORMAT,
        "program": BPF_PROGRAM,
        "cflags": list(cflags),
        "hooks": [list(hook) for hook in hooks],
        "event_layout": EVENT_STRUCT.format,
        "bcc": bcc_version() if bcc is None else bcc,
        "kernel": (os.uname().release, os.uname().machine) if release is None else release,
        # BCC compiles args->field into the offsets these files give
        "tracepoint_formats": formats,
        "possible_cpus": cpus if cpus is not None else cpu_list(
            "/sys/devices/system/cpu/possible"),
    }
    return sha256_hex(json.dumps(parts, sort_keys=True).encode())


class ProgramCache:
    """Compiled programs on disk, one file per key: a SHA-256 of the rest on
    the first line, the description as JSON after it. Root loads these into
    the kernel, so a file (or directory) not owned by root, or writable by
    group or others, is ignored with a warning. Written atomically (a
    temporary file, then rename). A directory that cannot be made or
    written (a read-only file system) only means compiling every time."""

    def __init__(self, directory, warn):
        self.directory = directory
        self.warn = warn

    def _safe(self, path, st):
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            self.warn("cache: %s is not owned by root or is writable by others; ignored"
                      % path)
            return False
        return True

    def read(self, key):
        path = os.path.join(self.directory, key)
        try:
            with open(path, "rb") as f:
                if not (self._safe(self.directory, os.stat(self.directory))
                        and self._safe(path, os.fstat(f.fileno()))):
                    return None
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.warn("cache: cannot read %s (%s); compiling" % (path, exc.strerror))
            return None
        checksum, _, body = data.partition(b"\n")
        try:
            if sha256_hex(body).encode() != checksum:
                raise ValueError("checksum mismatch")
            return json.loads(body)
        except ValueError as exc:
            self.warn("cache: %s is damaged (%s); compiling" % (path, exc))
            return None

    def write(self, key, saved):
        import tempfile
        body = json.dumps(saved, sort_keys=True).encode()
        data = sha256_hex(body).encode() + b"\n" + body
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if not self._safe(self.directory, os.stat(self.directory)):
                return
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".new-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(temp, os.path.join(self.directory, key))
            except BaseException:
                os.unlink(temp)
                raise
            self._prune()
        except OSError:
            pass                # read-only or full: compile next time too

    def _prune(self):
        entries = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if len(name) == 64 and not name.startswith("."):
                entries.append((os.stat(path).st_mtime, path))
        for _mtime, path in sorted(entries)[:-CACHE_KEEP]:
            os.unlink(path)


def load_program(cflags, hooks, cache, warn):
    """The program in the kernel: from the cache when it holds this
    configuration and the kernel takes it, else compiled (and cached)."""
    key = cache_key(cflags, hooks) if cache else None
    saved = cache.read(key) if cache else None
    if saved is not None:
        try:
            return Program(saved)
        except ProgramError as exc:
            warn("cache: the cached program cannot be used (%s); compiling" % exc)
    saved = compile_program(cflags, hooks)
    try:
        program = Program(saved)
    except ProgramError as exc:
        raise Fatal("loading the BPF program failed: %s" % exc) from None
    if cache:
        cache.write(key, saved)
    return program


def prog_recursion_misses(fd):
    """The kernel's count of times it skipped this program, or None where
    the kernel does not report it."""
    if fd is None:
        return None
    buf = ctypes.create_string_buffer(PROG_INFO_SIZE)
    size = ctypes.c_uint32(PROG_INFO_SIZE)
    if libbpf().bpf_obj_get_info(fd, buf, ctypes.byref(size)) != 0:
        return None
    return parse_recursion_misses(buf.raw, size.value)


def parse_recursion_misses(raw, filled):
    end = PROG_INFO_RECURSION_MISSES + 8
    if filled < end:
        return None
    return struct.unpack_from("<Q", raw, PROG_INFO_RECURSION_MISSES)[0]


def parse_records(chunk, sink, amend=None):
    """Decode a run of perf records: events are appended to sink (a list),
    amendments (flags AMEND) handed to amend; returns the number of lost
    events the kernel reported among them.

    Nearly always the run holds only samples of one size, and all of them
    are decoded by one C call (iter_unpack); the header bytes of every
    record are checked first, by slicing at that stride, and so is the low
    byte of every record's flags, for amendments."""
    n, rest = divmod(len(chunk), SAMPLE_SIZE)
    if not rest and n and chunk[0::SAMPLE_SIZE].count(PERF_RECORD_SAMPLE) == n \
            and chunk[6::SAMPLE_SIZE].count(SAMPLE_SIZE) == n \
            and not chunk[1::SAMPLE_SIZE].strip(b"\0") and not chunk[7::SAMPLE_SIZE].strip(b"\0") \
            and not chunk[FLAGS_IN_SAMPLE::SAMPLE_SIZE].translate(None, NOT_AMEND_BYTES):
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
            record = EVENT_STRUCT.unpack_from(chunk, offset + 12)
            if not record[10] & AMEND:
                sink.append(record)
            elif amend is not None:
                amend(record)
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

    def __init__(self, store, cpus, pages, wakeup):
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
                store(cpu, fd)
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

    def consume(self, sink, amend=None):
        """Read every ring to its end; events go to sink, amendments to
        amend (see parse_records). Returns lost."""
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
            lost += parse_records(chunk, sink, amend)
            _U64.pack_into(ring, 1032, head)                # data_tail: space is free
        return lost

    def close(self):
        self.epoll.close()
        for fd, ring, _size in self.rings:
            ring.close()
            os.close(fd)
        self.rings = []


class PerfBufferOpts(ctypes.Structure):
    """struct bcc_perf_buffer_opts (BCC's libbpf.h)."""
    _fields_ = [("pid", ctypes.c_int), ("cpu", ctypes.c_int), ("wakeup_events", ctypes.c_int)]


_RAW_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_LOST_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ulonglong)


class BccRings:
    """The same interface over BCC's own C reader (libbcc_bpf's
    perf_reader), for architectures PerfRings does not know; it calls back
    into Python once per event."""

    def __init__(self, store, cpus, pages, wakeup):
        self.lib = libbpf()
        self.pending = []
        self.lost = 0
        self.failure = None
        # kept referenced: the C library calls them
        self._callbacks = (_RAW_CALLBACK(self._on_event), _LOST_CALLBACK(self._on_lost))
        self.readers = []
        try:
            for cpu in cpus:
                opts = PerfBufferOpts(pid=-1, cpu=cpu, wakeup_events=wakeup)
                reader = self.lib.bpf_open_perf_buffer_opts(
                    ctypes.cast(self._callbacks[0], ctypes.c_void_p),
                    ctypes.cast(self._callbacks[1], ctypes.c_void_p), None, pages,
                    ctypes.byref(opts))
                if not reader:
                    raise OSError(ctypes.get_errno(), "opening BCC's perf reader on CPU %d" % cpu)
                self.readers.append(reader)
                store(cpu, self.lib.perf_reader_fd(reader))
        except Exception:
            self.close()
            raise
        self.array = (ctypes.c_void_p * len(self.readers))(*self.readers)

    def _on_event(self, _cookie, data, size):
        # An exception here would be printed and ignored by ctypes: it is
        # kept, and raised by consume().
        try:
            self.pending.append(EVENT_STRUCT.unpack_from(ctypes.string_at(data, size)))
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc

    def _on_lost(self, _cookie, count):
        self.lost += count

    def poll(self, timeout_ms):
        self.lib.perf_reader_poll(len(self.readers), self.array, timeout_ms)

    def consume(self, sink, amend=None):
        self.lib.perf_reader_consume(len(self.readers), self.array)
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        for record in self.pending:
            if not record[10] & AMEND:
                sink.append(record)
            elif amend is not None:
                amend(record)
        self.pending = []
        lost, self.lost = self.lost, 0
        return lost

    def close(self):
        while self.readers:
            self.lib.perf_reader_free(self.readers.pop())


# ---------------------------------------------------------------------------
# 6. The runtime: stop requests, output sinks, ordering, the loss ledger, and
# the Tracer that puts them together.
# ---------------------------------------------------------------------------
class StopRequest:
    """A stop asked for by a signal (SIGINT, SIGTERM, SIGHUP). Installed
    before anything else is done, so that a signal at any moment ends the
    run the same way: the loop sees the flag within one poll interval, and
    every write from then on, the summary line included, may wait for a
    blocked reader until `deadline` (WRITE_GRACE_S after the signal), not
    longer."""

    def __init__(self):
        self.signal = None
        self.deadline = None

    def __call__(self, signum, _frame=None):
        self.signal = signum
        if self.deadline is None:
            self.deadline = time.monotonic() + WRITE_GRACE_S

    def install(self):
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self)
        # A shell starts background jobs with SIGINT ignored; keep it so.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self)


class Sink:
    """Writes whole rows to a stream's file descriptor, and never waits on a
    blocked reader past the stop deadline.

    A stop signal cannot be trusted to interrupt a blocked write(2): Python
    retries it (PEP 475), and when part of it went out the short count is
    dropped by TextIOWrapper (CPython gh-85393), losing rows it then counts
    as printed. So the bytes are written here, with os.write, and counted:
    - to a pipe, FIFO, terminal or character device, through a second open
      of it (/proc/self/fd/N) with O_NONBLOCK: its flags are ours alone, the
      shell's terminal and a pipe shared with other writers keep theirs. A
      full reader is waited for with poll() in WAIT_STEP_MS steps, so that a
      stop request is seen. To a pipe the data goes in pieces of at most
      PIPE_BUF bytes cut at row ends, which the kernel writes whole or not
      at all: a row is never torn.
    - to a regular file, straight (it does not block for long);
    - where the descriptor cannot be opened again (a socket), in pieces of at
      most PIPE_BUF bytes, each after poll() says there is room for it.
    A stream without a descriptor (a test's capture) gets the text as is."""

    def __init__(self, stream, stop):
        self.stream = stream
        self.stop = stop
        self.fd = None
        self.own_fd = False
        self.piece = 1 << 30
        self.poll_first = False
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
        except (AttributeError, OSError, ValueError):
            return                                  # text mode
        stream.flush()
        self.fd = fd
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            return
        self.piece = PIPE_BUF if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) else 1 << 30
        try:
            self.fd = os.open("/proc/self/fd/%d" % fd,
                              os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            self.own_fd = True
        except OSError:
            self.piece = PIPE_BUF
            self.poll_first = True

    def write_rows(self, text):
        """Write rows (each ends with its only newline). Raises WriteAborted
        with `rows`, how many went out whole."""
        if self.fd is None:
            self.write_text(text)
            return
        data = text.encode(self.encoding, "backslashreplace")
        try:
            self.write(data)
        except WriteAborted as exc:
            exc.rows = data.count(b"\n", 0, exc.written)
            raise

    def write_text(self, text):
        """Write text; returns the bytes written. Raises WriteAborted."""
        if self.fd is None:
            self.stream.write(text)
            self.stream.flush()
            return len(text)
        return self.write(text.encode(self.encoding, "backslashreplace"))

    def write(self, data):
        view = memoryview(data)
        done, size = 0, len(data)
        while done < size:
            end = size
            if size - done > self.piece:
                cut = data.rfind(b"\n", done, done + self.piece)
                if cut < 0:                     # one row longer than a piece
                    cut = data.find(b"\n", done + self.piece)
                end = size if cut < 0 else cut + 1
            if self.poll_first:
                self._wait(done)
            try:
                done += os.write(self.fd, view[done:end])
            except BlockingIOError:
                self._wait(done)
        return done

    def _wait(self, done):
        """Wait until the reader makes room, or the stop deadline passes."""
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while True:
            step = WAIT_STEP_MS
            deadline = self.stop.deadline
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WriteAborted(done)
                step = max(1, min(step, int(left * 1000) + 1))
            if poller.poll(step):
                return              # room, or an error the write will raise

    def close(self):
        if self.own_fd:
            self.own_fd = False
            os.close(self.fd)


def _is_devnull(stream):
    try:
        st = os.fstat(stream.fileno())
        null = os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_rdev, st.st_ino) == (null.st_rdev, null.st_ino)


_ts_key = operator.itemgetter(0)


class Reorderer:
    """Holds events back until no earlier one can still arrive, then gives
    them out in kernel-timestamp order.

    Per-CPU perf buffers are read one CPU after another, so a batch can hold
    a later event from one CPU before an earlier one from another. The loop
    takes a horizon (the monotonic clock, less a margin for a BPF program
    between its timestamp and its perf_submit) and then reads every buffer
    to the end: everything stamped before the horizon has then been read,
    and can leave in order. An event is held at most one poll interval plus
    the margin. One that took longer than the margin to reach its buffer (a
    vCPU preempted in the middle of the program, say) arrives after later
    ones have gone out: it is given out at once, and counted in `late`."""

    def __init__(self):
        self.pending = []           # the readers append new events here
        self.late = 0
        self._last = 0              # the newest timestamp given out

    def amend(self, record):
        """Merge the facts of an amendment (flags AMEND: what the kernel said
        after a socket's move to CLOSE) into that row, still pending: the
        one with its skaddr and time. The kernel sends it on the same CPU's
        ring, after the row, so the row was read first; it was given out
        already only if the fact came later than the reorder margin, and
        then the fact is counted as late and the row keeps what it had."""
        sk, ts, rflags = record[1], record[0], record[16]
        pending = self.pending
        for i in range(len(pending) - 1, -1, -1):
            ev = pending[i]
            if ev[1] == sk and ev[0] == ts and ev[9] == TCP_CLOSE:
                pending[i] = ev[:16] + (
                    ev[16] | rflags,
                    record[17] if rflags & R_RST_REASON else ev[17],
                    record[18] if rflags & R_ERRNO else ev[18],
                    ev[19])
                return
        self.late += 1
    def release(self, horizon=None):
        """The events stamped at or before horizon (all if None), sorted."""
        pending = self.pending
        if not pending:
            return []
        pending.sort(key=_ts_key)
        if horizon is None or pending[-1][0] <= horizon:
            cut = len(pending)
        else:
            cut = bisect.bisect_right(pending, horizon, key=_ts_key)
        ready = pending[:cut]
        del pending[:cut]           # the same list object: readers hold it
        if ready:
            if ready[0][0] < self._last:
                self.late += bisect.bisect_left(ready, self._last, key=_ts_key)
            self._last = max(self._last, ready[-1][0])
        return ready


class Ledger:
    """Where every event went: the counts of the exit summary, the periodic
    loss reports and the journal's loss records. See LOSS ACCOUNTING in the
    man page; the names here are the summary's words.
      printed       rows written out whole (or, with stdout discarded,
                    events handed to the journal)
      lost          events the perf buffers had no room for, counted in the
                    kernel at perf_submit (the larger of that count and the
                    PERF_RECORD_LOST records read, which can come late or
                    never)
      skipped       tracepoint hits the kernel did not run the program for
                    (its recursion_misses), host-wide, before any filter
      gaps          transitions found missing in the history of a socket in
                    view: some of the skipped events, seen from the socket's
                    side (a lost event is not a gap: the kernel keeps the
                    history before it submits the event)
      not_written   events read, but not written because the output stayed
                    blocked past the stop grace
      late          events given out after a later one (out of order), and
                    facts about a row's reason that came after the row had
                    gone out (the row shows what was known)
      unsent        with -Y, journal records not sent (see JournalWriter)"""

    FIELDS = ("printed", "lost", "skipped", "gaps", "not_written", "late", "unsent")

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0)
        self.lost_records = 0
        self.reported = dict.fromkeys(self.FIELDS, 0)


def proc_net_sockets(proc="/proc", states=None):
    """The TCP sockets of every network namespace a process is in, from
    /proc/PID/net/tcp{,6} (one process per namespace), as {(namespace,
    family, laddr, lport, raddr, rport): (state, inode)}; addresses as the
    16 bytes the program uses. Only sockets in `states`, if given.

    The file prints each address as 32-bit words in the host's byte order;
    its state column is hex. (Its timer columns say nothing of how long the
    socket has been in its state.)"""
    found = {}
    for namespace, family, parts in proc_net_tcp(proc):
        try:
            if len(parts) < 10:
                continue
            state = int(parts[3], 16)
            if states is not None and state not in states:
                continue
            if parts[5].startswith("03:"):
                # a time-wait mini-socket (also shown as FIN_WAIT2): no
                # tracepoint follows it, so the tracer cannot watch the
                # ones it starts either
                continue
            (la, lp), (ra, rp) = _proc_endpoint(parts[1]), _proc_endpoint(parts[2])
            found[(namespace, family, la, lp, ra, rp)] = (state, int(parts[9]))
        except (ValueError, IndexError):
            continue
    return found


def _proc_endpoint(text):
    address, _, port = text.partition(":")
    words = [int(address[i:i + 8], 16) for i in range(0, len(address), 8)]
    raw = struct.pack("=%dI" % len(words), *words)
    return raw.ljust(16, b"\0"), int(port, 16)


def socket_owners(inodes, proc="/proc"):
    """{inode: pid} for the socket inodes among `inodes` that one process
    (thread group) holds: a socket held by several processes (inherited
    over fork, or passed) has no single owner, and is left out: unknown,
    not a guess."""
    holders = {}
    wanted = set(inodes)
    if not wanted:
        return {}
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        base = "%s/%s/fd" % (proc, pid)
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("%s/%s" % (base, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in wanted:
                    holders.setdefault(inode, set()).add(int(pid))
    return {inode: pids.pop() for inode, pids in holders.items() if len(pids) == 1}


class StuckWatch:
    """--stuck: reads the program's sockets map (what the kernel already
    keeps of every live socket: its state, since when, its owner and
    addresses) at most once a second, and reports each socket that has been
    in a watched state for at least the threshold, once per socket and
    state. Nothing is added to the per-event path.

    Sockets that predate the tracer are not in the map until they move:
    they are read from /proc/PID/net/tcp{,6} at start, and those still in
    the same state (same inode) once the threshold has passed since then
    are reported with that time as their age, marked as a lower bound
    (AGE_AT_LEAST), their owner found through /proc/PID/fd.

    Bounded: the map holds at most MAX_SOCKETS sockets (131072; LRU: on a
    host with more, the least recently changed are evicted, and a stuck
    socket is the least recently changed of all); `evicted` is a lower
    bound of the entries the map lost that way, from the program's counts
    of entries made and deleted. `reported` holds one entry per socket
    reported and still stuck, at most the map's size."""

    def __init__(self, args, program, procs, proc="/proc"):
        self.args = args
        self.program = program
        self.procs = procs
        self.proc = proc
        self.threshold_ns = int(args.stuck * 1e9)
        self.states = frozenset(args.stuck_states or STUCK_STATES)
        self.interval_ns = max(1, min(STUCK_CHECK_NS, self.threshold_ns // 2))
        self.cap = args.max_sockets or DEFAULT_MAX_SOCKETS
        self.next_ns = 0
        self.reported = {}      # skaddr -> since, of the state reported
        self.visible = set()    # those of them in view (reported)
        self.stuck_now = {}     # state -> sockets in view stuck in it now
        self.count = 0
        self.evicted = 0
        self.early = None       # sockets that predate the tracer
        self.early_ns = None

    def start(self):
        """Read the sockets that predate the tracer (call after attach)."""
        self.early = proc_net_sockets(self.proc, self.states)
        self.early_ns = time.monotonic_ns()

    def _in_view(self, family, lport, rport, opid):
        a = self.args
        if a.ipv4 and family != socket.AF_INET or a.ipv6 and family != socket.AF_INET6:
            return False
        if a.localport and lport not in a.localport:
            return False
        if a.remoteport and rport not in a.remoteport:
            return False
        return not a.pid or opid == a.pid

    def check(self, now_ns):
        """The stuck reports due at now_ns (CLOCK_MONOTONIC), as events."""
        if now_ns < self.next_ns:
            return []
        self.next_ns = now_ns + self.interval_ns
        program = self.program
        tracked = program.percpu_sum("counters", COUNT_TRACKED)
        reports, reported, entries = [], {}, 0
        visible, stuck_now = set(), collections.Counter()
        tuples = set()
        threshold, states, done = self.threshold_ns, self.states, self.reported
        unpack_key, unpack = _U64.unpack, SOCK_INFO_STRUCT.unpack_from
        for key, value in program.iterate("sockets", 8, SOCK_INFO_STRUCT.size):
            entries += 1
            since, osince, opid, oflags, state, ocomm, family, lport, rport, _pad, \
                laddr, raddr = unpack(value)
            if self.early:
                tuples.add((family, laddr, lport, raddr, rport))
                tuples.add((family, laddr, None, raddr, rport))
            if state not in states or since > now_ns or now_ns - since < threshold:
                continue
            sk = unpack_key(key)[0]
            reported[sk] = since
            if done.get(sk) == since:
                if sk in self.visible:
                    visible.add(sk)
                    stuck_now[state] += 1
                continue
            ev = Event(now_ns, sk, (now_ns - since) // 1000, 0, opid, lport, rport, family,
                       state, state, SPAN_KNOWN | STUCK_REPORT | oflags, laddr, raddr,
                       STUCK_COMM, ocomm, osince)
            owner = self.procs.owner(ev) if oflags & OWNER_KNOWN else None
            if not self._in_view(family, lport, rport, owner[0] if owner else 0):
                continue
            reports.append(ev._replace(pid=owner[0] if owner else 0))
            visible.add(sk)
            stuck_now[state] += 1
        self.reported = reported
        self.visible, self.stuck_now = visible, dict(stuck_now)
        forgotten = program.percpu_sum("counters", COUNT_FORGOTTEN)
        # A lower bound: see the class docstring.
        self.evicted = max(self.evicted, tracked - forgotten - entries)
        reports.sort(key=lambda ev: (-ev.span_us, ev.skaddr))
        if self.early is not None and now_ns - self.early_ns >= threshold:
            reports.extend(self._early_reports(now_ns, tuples))
        self.count += len(reports)
        return reports

    def _early_reports(self, now_ns, tuples):
        """The sockets that predate the tracer and are still in the state
        they were in at start; each only this once (if one moves later, the
        program tracks it from that move on)."""
        early, self.early = self.early, None
        still = proc_net_sockets(self.proc, self.states)
        stuck = {k: v for k, v in early.items() if still.get(k) == v and
                 (k[1], k[2], k[3], k[4], k[5]) not in tuples and
                 (k[1], k[2], None, k[4], k[5]) not in tuples}
        owners = socket_owners([inode for _state, inode in stuck.values()], self.proc)
        reports = []
        age_us = (now_ns - self.early_ns) // 1000
        for (_ns, family, laddr, lport, raddr, rport), (state, inode) in sorted(
                stuck.items(), key=lambda item: item[1][1]):
            pid = owners.get(inode, 0)
            if not self._in_view(family, lport, rport, pid):
                continue
            flags = SPAN_KNOWN | STUCK_REPORT | AGE_AT_LEAST
            ocomm = b""
            if pid:
                flags |= OWNER_KNOWN
                try:
                    with open("%s/%d/comm" % (self.proc, pid), "rb") as f:
                        ocomm = f.read().rstrip(b"\n")[:15]
                except OSError:
                    pass
            reports.append(Event(now_ns, 0, age_us, pid, pid, lport, rport, family, state,
                                 state, flags, laddr, raddr, STUCK_COMM + b">=",
                                 ocomm.ljust(16, b"\0"), self.early_ns))
        return reports

    def summary(self):
        text = "stuck: %d reported" % self.count
        if self.evicted:
            text += ("; at least %d sockets were evicted from the full socket map "
                     "(%d entries), stuck ones first: they cannot be reported"
                     % (self.evicted, self.cap))
        return text


class Lifecycles:
    """--lifecycle: each socket's history, kept in user space from its events
    (key: skaddr), given out as one Life when the socket reaches CLOSE.

    An event's span is the time its socket spent in OLDSTATE: it is added
    to that state's time, or makes it unknown when the kernel did not know
    it (SPAN_KNOWN unset); a missing transition (OLDSTATE is not the state
    the last event entered: an event lost or skipped) makes both the state
    left and the one never seen entered unknown. Nothing is guessed.

    The lifetime counts from the socket's first event seen. It is exact when
    that event is its first transition (CLOSE -> SYN_SENT, a connect; LISTEN
    -> SYN_RECV, an accepted socket), a lower bound otherwise (a socket that
    predates the tracer, or whose first event a filter hid: a client's
    first event has LPORT 0), to which the first span seen is added when
    known. Addresses and ports are the latest non-zero ones seen (a client's
    port is chosen after its first event). The owner is the close event's,
    else the first one known.

    Listeners (sockets that enter or leave LISTEN otherwise than by an
    accepted socket's LISTEN -> SYN_RECV) get no row: they are not
    connections. At most `cap` sockets are tracked; past that the oldest
    (first seen) is dropped and counted in `evicted` (its later events start
    a history with a lower-bound lifetime). Work per event: a dict lookup
    and a few assignments, only with --lifecycle."""

    def __init__(self, procs, cap=DEFAULT_MAX_LIFECYCLES, reasons=None):
        self.procs = procs
        self.cap = cap
        self.reasons = reasons or Reasons()     # why each one ended
        # skaddr -> [first_ts, at_least, last_new, {state: us or None},
        #            family, laddr, lport, raddr, rport, owner, listener]
        self.live = {}
        self.count = 0
        self.evicted = 0

    def add(self, events):
        """Feed events in timestamp order; the Lifes completed by them."""
        live, done = self.live, []
        for ev in events:
            ts, sk, span, _pid, _op, lport, rport, family, old, new, flags, \
                laddr, raddr, _comm, _oc, _os, _rf, _rr, _er, _re = ev
            h = live.get(sk)
            if h is None:
                if len(live) >= self.cap:
                    del live[next(iter(live))]
                    self.evicted += 1
                accepted = old == TCP_LISTEN and new == 3
                start = ts
                if old != 7 and not accepted and flags & SPAN_KNOWN:
                    start -= span * 1000
                h = live[sk] = [start, old != 7 and not accepted, None, {}, family,
                                laddr, lport, raddr, rport, None,
                                (old == TCP_LISTEN or new == TCP_LISTEN) and not accepted]
            elif old == TCP_LISTEN or new == TCP_LISTEN:
                h[10] = True
            times = h[3]
            if h[2] is not None and old != h[2]:
                times[h[2]] = None              # entered unseen: time unknown
                times[old] = None
            elif old != 7 and old != TCP_LISTEN:
                known = times.get(old, 0)
                times[old] = known + span if known is not None and flags & SPAN_KNOWN \
                    else None
            h[2] = new
            if lport:
                h[5], h[6] = laddr, lport
            if rport:
                h[7], h[8] = raddr, rport
            if h[9] is None and flags & OWNER_KNOWN:
                h[9] = self.procs.owner(ev)
            if new != 7:
                continue
            del live[sk]
            if h[10]:
                continue
            owner = self.procs.owner(ev) if flags & OWNER_KNOWN else None
            done.append(Life(ts, sk, h[4], h[5], h[6], h[7], h[8], max(0, ts - h[0]) // 1000,
                             h[1], owner or h[9], list(times.items()), self.reasons(ev)))
        self.count += len(done)
        return done

    def open_connections(self):
        """Sockets tracked that have not closed, listeners left out."""
        return sum(1 for h in self.live.values() if not h[10])

    def summary(self, printed):
        text = ("lifecycle: %d connections closed (%d printed), %d still open at exit "
                "(not printed)" % (self.count, printed, self.open_connections()))
        if self.evicted:
            text += ("; %d sockets dropped from the full table (%d entries), oldest first: "
                     "their lifetimes are lower bounds" % (self.evicted, self.cap))
        return text


class Tracer:
    """Compiles the program, fills its maps, attaches it, and moves events
    from the perf buffers to the output in kernel-timestamp order, keeping
    the Ledger."""

    def __init__(self, args, out, journal_sender=None, *, stop=None, err=None,
                 procs=None):
        self.args = args
        self.stop = stop or StopRequest()
        self.out = Sink(out, self.stop)
        self.err = Sink(err or sys.stderr, self.stop)
        self.formatter = Formatter(args, procs=procs)
        self.reorder = Reorderer()
        # facts that came after a CLOSE row (see Reorderer.amend)
        self.amend = self.reorder.amend if reasons_wanted(args) else None
        self.reason_filter = frozenset(args.reasons or ())
        self.ledger = Ledger()
        self.rings = None
        self.journal = None
        self.dropped_reported = 0       # journal.dropped at the last loss report
        # --metrics, --metrics-file: counts kept here, published by a
        # MetricsExporter (which main starts before the program is attached)
        self.metrics = None
        if args.metrics or args.metrics_file:
            self.metrics = Metrics(args.metrics_by or (), local_port_range(), warn=self.warn,
                                   reasons=self.formatter.reasons,
                                   in_kernel=metrics_in_kernel(args))
        if journal_sender is not None:
            self.journal = JournalWriter(self.formatter.clock, self.formatter.procs,
                                         journal_sender, args.journal_queue,
                                         self.formatter.reasons)
        # A service discards stdout (its records go to the journal): then
        # rows are not even formatted; nor with --quiet.
        self.write_rows = not (args.quiet or _is_devnull(out))
        self.report_ns = 0
        self.skipped_known = False
        self.program = None
        self.stuck = None           # a StuckWatch, with --stuck (see load)
        self.stuck_rows = StuckFormatter(self.formatter) if args.stuck else None
        # --lifecycle: histories kept here, one row per socket at its CLOSE
        self.lifecycles = self.life_rows = None
        if args.lifecycle:
            self.lifecycles = Lifecycles(self.formatter.procs,
                                         args.max_sockets or DEFAULT_MAX_LIFECYCLES)
            self.life_rows = LifeFormatter(self.formatter)
        self.filtered = bool(args.localport or args.remoteport or args.pid or args.ipv4
                             or args.ipv6 or args.from_states or args.to_states
                             or args.min_span is not None or args.reasons)

    def warn(self, message):
        """A line on stderr; it too gives up on a blocked reader after a
        stop request's grace."""
        try:
            self.err.write_text("%s: %s\n" % (PROG, message))
        except (WriteAborted, BrokenPipeError):
            pass

    # -- set-up ------------------------------------------------------------
    def load(self):
        facts = probe_kernel()
        cflags = bpf_cflags(self.args, facts)
        hooks = bpf_hooks(self.args, facts)
        cache = None
        if not self.args.no_cache:
            cache = ProgramCache(os.environ.get("CACHE_DIRECTORY") or CACHE_DIR, self.warn)
        self.program = load_program(cflags, hooks, cache, self.warn)
        try:
            # Everything the program reads or writes is in place before it
            # is attached: the maps filled, and the perf rings open (an event
            # submitted to a CPU without one would vanish uncounted).
            self._seed_listeners()
            self._fill_port_map("local_ports", self.args.localport)
            self._fill_port_map("remote_ports", self.args.remoteport)
            if self.metrics is not None and self.metrics.in_kernel:
                self.program.update("metric_bounds", struct.pack("<I", 0),
                                    struct.pack("<%dQ" % len(DURATION_BOUNDS_US),
                                                *DURATION_BOUNDS_US))
                self.metrics.attach_kernel(self._metric_counts)
            cpus = cpu_list("/sys/devices/system/cpu/online")
            Rings = PerfRings
            if os.uname().machine not in PERF_EVENT_OPEN or self.args.bcc_reader:
                Rings = BccRings
            self.rings = Rings(self._store_ring, cpus, self.args.perf_pages, WAKEUP_EVENTS)
            self.skipped_known = prog_recursion_misses(self.program.prog_fd) is not None
            self.program.attach()
        except Exception as exc:
            self.close()
            raise Fatal("loading or attaching the BPF program failed: %s"
                        % (str(exc).splitlines() or ["unknown error"])[0]) from None
        if self.args.stuck:
            self.stuck = StuckWatch(self.args, self.program, self.formatter.procs)
            self.stuck.start()

    def _store_ring(self, cpu, fd):
        self.program.update("events", struct.pack("<i", cpu), struct.pack("<i", fd))

    def _fill_port_map(self, name, ports):
        for index, word in enumerate(port_bitmap(ports or ())):
            if word:
                self.program.update(name, struct.pack("<I", index), struct.pack("<Q", word))

    def _seed_listeners(self):
        # Listeners that predate the tracer have unknown owners: say so in
        # the map, so that a new listener on the same port (another network
        # namespace, or SO_REUSEPORT) makes the port ambiguous, not wrong.
        for (family, port), count in existing_listeners().items():
            # struct listener: osince, opid (0: unknown), count, ocomm
            self.program.update("listeners", struct.pack("<I", (family << 16) | port),
                                struct.pack("<QII16s", 0, 0, count, b""))

    def detach(self):
        """No new events from here on."""
        if self.program is not None:
            self.program.detach()

    def _metric_counts(self):
        return metric_counts(self.program.percpu_words("metric_counts"))

    def close(self):
        if self.journal is not None:
            self.journal.close()
        if self.rings is not None:
            rings, self.rings = self.rings, None
            rings.close()
        if self.program is not None:
            if self.metrics is not None:
                self.metrics.detach_kernel()    # its last counts, kept
            program, self.program = self.program, None
            program.close()
        self.out.close()

    # -- the loop --------------------------------------------------------
    def run(self):
        """Trace until a stop signal, --duration or --count; then detach and
        give out everything read. Output that stays blocked past the stop
        grace ends it early: what was read and not written is counted."""
        if self.journal is not None:
            self.journal.start()
        try:
            if self.write_rows:
                self.out.write_text((self.life_rows or self.formatter).header())
            self._loop()
            self.detach()
            if not self.done:
                self._consume()
                self._drain(None)
        except WriteAborted:
            self.detach()
            self._consume()
            self.ledger.not_written += len(self.reorder.pending)
            self.reorder.pending.clear()
        self.report_lost(final=True)
        if self.journal is not None:
            # What journald has not taken yet, within the stop grace.
            self.journal.finish(self.stop)
            self.ledger.unsent = self.journal.unsent
            if self.metrics is not None:
                self.metrics.set_lost(journal=self.ledger.unsent)
            failure = self.journal.warning()
            if failure:
                self.warn(failure)
        if self.stuck is not None:
            self.warn(self.stuck.summary())
        if self.lifecycles is not None:
            self.warn(self.lifecycles.summary(self.ledger.printed))

    def _loop(self):
        poll = self.rings.poll
        clock = time.monotonic_ns
        deadline = None
        if self.args.duration is not None:
            deadline = clock() + int(self.args.duration * 1e9)
        while self.stop.signal is None and not self.done:
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
            if self.stuck is not None:
                self._report_stuck(horizon)
            self.report_lost()

    @property
    def done(self):
        count = self.args.count
        return count is not None and self.ledger.printed >= count

    def _consume(self):
        try:
            self.ledger.lost_records += self.rings.consume(self.reorder.pending, self.amend)
        except (Fatal, WriteAborted):
            raise
        except Exception as exc:
            raise Fatal("reading an event failed: %s: %s"
                        % (type(exc).__name__, exc)) from None

    def _drain(self, horizon):
        ready = self.reorder.release(horizon)
        if ready and self.reason_filter:
            # what the kernel could not decide (see FILTER_REASONS)
            reason_of, wanted = self.formatter.reasons, self.reason_filter
            ready = [ev for ev in ready if reason_of(ev).word in wanted]
        if not ready:
            return
        if self.lifecycles is not None:
            self._drain_lifecycles(ready)
            return
        ledger = self.ledger
        if self.args.count is not None:
            ready = ready[:self.args.count - ledger.printed]
        if self.metrics is not None:
            self.metrics.add(ready)
        self.formatter.procs.refresh()
        if self.write_rows:
            row = self.formatter.row
            try:
                self.out.write_rows("".join([row(ev) for ev in ready]))
            except WriteAborted as exc:
                ledger.printed += exc.rows
                ledger.not_written += len(ready) - exc.rows
                raise
        if self.journal is not None:
            self.journal.events(ready)
        ledger.printed += len(ready)

    def _drain_lifecycles(self, ready):
        """--lifecycle: the events go to the histories; the sockets they
        close are the rows (counted as printed; --count counts them)."""
        if self.metrics is not None:
            self.metrics.add(ready)
        self.formatter.procs.refresh()
        lives = self.lifecycles.add(ready)
        if not lives:
            return
        ledger = self.ledger
        if self.args.count is not None:
            lives = lives[:self.args.count - ledger.printed]
        if self.write_rows:
            row = self.life_rows.row
            try:
                self.out.write_rows("".join([row(life) for life in lives]))
            except WriteAborted as exc:
                ledger.printed += exc.rows
                ledger.not_written += len(lives) - exc.rows
                raise
        if self.journal is not None:
            for life in lives:
                self.journal.lifecycle(life)
        ledger.printed += len(lives)

    def _report_stuck(self, now_ns):
        """--stuck: the reports due, written like rows (and counted as
        printed), sent to the journal with their own MESSAGE_ID."""
        reports = self.stuck.check(now_ns)
        if self.metrics is not None:
            now = self.stuck.stuck_now
            self.metrics.set_stuck({state: now.get(state, 0) for state in self.stuck.states})
        if not reports:
            return
        ledger = self.ledger
        if self.args.count is not None:
            reports = reports[:self.args.count - ledger.printed]
        self.formatter.procs.refresh()
        if self.write_rows:
            row = self.stuck_rows.row
            try:
                self.out.write_rows("".join([row(ev) for ev in reports]))
            except WriteAborted as exc:
                ledger.printed += exc.rows
                ledger.not_written += len(reports) - exc.rows
                raise
        if self.journal is not None:
            for ev in reports:
                self.journal.stuck(ev)
        ledger.printed += len(reports)

    def read_counters(self):
        """The kernel's counts: skipped (recursion_misses), and the per-CPU
        counters of the program (perf_submit failures, gaps)."""
        ledger = self.ledger
        if self.program is not None:
            skipped = prog_recursion_misses(self.program.prog_fd)
            if skipped is not None:
                ledger.skipped = skipped
            submit_failed = self.program.percpu_sum("counters", COUNT_SUBMIT_FAILED)
            ledger.gaps = self.program.percpu_sum("counters", COUNT_GAP)
            ledger.lost = max(submit_failed, ledger.lost_records)
        ledger.late = self.reorder.late
        if self.journal is not None:
            ledger.unsent = self.journal.unsent
        if self.metrics is not None:
            self.metrics.set_lost(
                perf_buffer=ledger.lost, kernel_skip=ledger.skipped if self.skipped_known else None,
                gap=ledger.gaps, not_written=ledger.not_written,
                journal=ledger.unsent)

    def report_lost(self, final=False):
        """Losses, as they happen: at most one stderr line (and with -Y one
        journal record) a second, with the running totals."""
        now = time.monotonic_ns()
        if not final and now - self.report_ns < 1_000_000_000:
            return
        self.report_ns = now
        self.read_counters()
        ledger = self.ledger
        if self.journal is not None:
            failure = self.journal.warning()
            if failure:
                self.warn(failure)
        new = {name: getattr(ledger, name) - ledger.reported[name]
               for name in ("lost", "skipped", "gaps", "unsent")}
        if not any(new.values()):
            return
        ledger.reported.update((name, getattr(ledger, name)) for name in new)
        parts = []
        if new["lost"]:
            parts.append("lost %d events (%d in all): perf buffers overflowed"
                         % (new["lost"], ledger.lost))
        if new["skipped"]:
            parts.append("the kernel skipped %d events (%d in all)%s"
                         % (new["skipped"], ledger.skipped,
                            ", some perhaps of sockets the filters hide" if self.filtered
                            else ""))
        if new["gaps"]:
            parts.append("%d transitions missing from sockets' histories (%d in all)"
                         % (new["gaps"], ledger.gaps))
        if new["unsent"]:
            parts.append("%d journal records not sent (%d in all)%s"
                         % (new["unsent"], ledger.unsent,
                            ": journald fell behind" if self.journal.dropped > self.dropped_reported
                            else ""))
            self.dropped_reported = self.journal.dropped
        self.warn("; ".join(parts))
        if self.journal is not None:
            self.journal.lost(new["lost"] + new["skipped"], ledger.lost + ledger.skipped,
                              new["gaps"], ledger.gaps, new["unsent"], ledger.unsent)

    def summary(self):
        ledger = self.ledger
        text = "summary: %d printed, %d lost" % (ledger.printed, ledger.lost)
        if self.skipped_known:
            text += ", %s%d skipped by the kernel" % (
                "up to " if self.filtered else "", ledger.skipped)
        text += ", %d gaps, %d not written, %d late" % (
            ledger.gaps, ledger.not_written, ledger.late)
        if self.journal is not None:
            text += ", %d journal records not sent" % ledger.unsent
        return text


# ---------------------------------------------------------------------------
# 7. The command line: argument types, the parser, main().
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
    tcpstates -x            # add why it ended, each socket's owner (PID, name, ...)
    tcpstates -p 181        # only sockets owned by PID 181
    tcpstates -Y            # also record each event in the systemd journal
    tcpstates -j            # JSON lines, for jq and log shippers
    tcpstates --from SYN_SENT --to CLOSE    # failed connects
    tcpstates --reason timeout,refused,unreachable  # failed connects, and why
    tcpstates --min-span 1000               # states that lasted 1 s or more
    tcpstates -j --duration 60 --count 1000 # bounded run
    tcpstates --stuck 60 -x                 # also sockets stuck 60 s (owner shown)
    tcpstates -l                            # one row per connection, time per state

REASON (with -x or --reason; "reason" with -j, TCPSTATES_REASON with -Y)
says why a connection ended, on its move to CLOSE, as the kernel tells it:
refused, reset-by-peer, reset-sent[:KERNEL_REASON], timeout[:N-retries or
:keepalive], unreachable, aborted (closed with data unread), closed (the
orderly FIN exchange), listener-closed, or - when the kernel did not say.
REASONS in tcpstates(8) says how each is found.

At exit one line goes to stderr: "summary: N printed, N lost, N skipped by
the kernel, N gaps, N not written, N late" (with -Y also "N journal records
not sent"; LOSS ACCOUNTING in tcpstates(8) says what each counts); nothing
the kernel made is missing from it.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # The message can quote the user's argument: keep it one safe line.
        raise UsageError(safe_text(message))


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


def reason_list(text):
    """Parse "timeout,refused" into a tuple of reasons in REASONS' order; for
    argparse's type=."""
    words = set()
    for item in text.split(","):
        word = item.strip().lower()
        if word not in REASONS:
            raise argparse.ArgumentTypeError(
                "unknown reason %r; reasons: %s" % (item.strip(), ", ".join(REASONS)))
        words.add(word)
    return tuple(w for w in REASONS if w in words)


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


def stuck_seconds(text):
    return _positive_number(text, "age")


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


def _journal_queue(text):
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1 << 24:
        raise argparse.ArgumentTypeError("invalid queue size %r: 1 to 16777216" % text)
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


def metrics_address(text):
    """--metrics [ADDR:]PORT -> (address, port). ADDR is an IPv4 address, or
    an IPv6 address in brackets; without it, 127.0.0.1: the metrics are
    served beyond this host only when an address says so."""
    address, port = METRICS_DEFAULT_ADDRESS, text
    family = socket.AF_INET
    if text.startswith("["):
        address, close, port = text[1:].partition("]:")
        family = socket.AF_INET6
        if not close:
            raise argparse.ArgumentTypeError(
                "invalid address %r: write an IPv6 address as [ADDR]:PORT, e.g. [::1]:9977"
                % text)
    elif ":" in text:
        address, _, port = text.rpartition(":")
        if ":" in address:
            raise argparse.ArgumentTypeError(
                "invalid address %r: write an IPv6 address in brackets, e.g. [::1]:9977" % text)
        if not address:
            raise argparse.ArgumentTypeError(
                "invalid address %r: no address before the colon (0.0.0.0:PORT listens "
                "on every address, PORT alone on 127.0.0.1)" % text)
    try:
        socket.inet_pton(family, address)
    except (OSError, ValueError):
        raise argparse.ArgumentTypeError(
            "invalid address %r: ADDR is an IP address, e.g. 127.0.0.1:9977 or [::1]:9977"
            % address) from None
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            "invalid port %r: [ADDR:]PORT with a port from 1 to 65535" % port)
    return address, int(port)


def metrics_labels(text):
    """--metrics-by "lport,comm" -> the chosen label names, in a fixed order."""
    names = [item.strip() for item in text.split(",")]
    for name in names:
        if name not in METRICS_BY_CHOICES:
            raise argparse.ArgumentTypeError(
                "invalid label %r: choose from %s (comma-separated)"
                % (name, ",".join(METRICS_BY_CHOICES)))
    return tuple(name for name in METRICS_BY_CHOICES if name in names)


def file_path(text):
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError("invalid path %r" % text)
    return text


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
                        help="add why a connection ended (REASON) and the socket's "
                             "owner: O-PID, O-COMM, O-FROM, CGROUP")
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
    parser.add_argument("--reason", dest="reasons", type=reason_list, metavar="REASONS",
                        help="only connection ends for these reasons: %s" % ", ".join(REASONS))
    parser.add_argument("--duration", type=seconds, metavar="SECONDS",
                        help="stop after SECONDS seconds")
    parser.add_argument("--count", type=event_count, metavar="N",
                        help="stop after N events")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4", action="store_true",
                        help="trace IPv4 only")
    family.add_argument("-6", "--ipv6", action="store_true",
                        help="trace IPv6 only")
    parser.add_argument("--stuck", type=stuck_seconds, metavar="SECONDS",
                        help="also report each socket that stays SECONDS in SYN_SENT, "
                             "SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK or "
                             "CLOSING, once per socket and state (C-COMM STUCK)")
    parser.add_argument("--stuck-states", type=state_list, metavar="STATES",
                        help="the states --stuck watches instead")
    parser.add_argument("-l", "--lifecycle", action="store_true",
                        help="instead of one row per transition, one row per connection "
                             "when it closes: owner, lifetime, time in each state")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile the BPF program; neither read nor write the cache")
    parser.add_argument("--metrics", type=metrics_address, metavar="[ADDR:]PORT",
                        help="serve Prometheus metrics over HTTP on PORT (address "
                             "127.0.0.1 unless ADDR is given)")
    parser.add_argument("--metrics-file", type=file_path, metavar="PATH",
                        help="write Prometheus metrics to PATH every %g s (for "
                             "node_exporter's textfile collector)" % METRICS_FILE_INTERVAL_S)
    parser.add_argument("--metrics-by", type=metrics_labels, metavar="LABELS",
                        help="also label the metrics by lport, comm or both "
                             "(at most %d label sets)" % METRICS_BY_LIMIT)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print no rows (for --metrics, --metrics-file or -Y alone)")
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--perf-pages", type=_perf_pages,
                        default=DEFAULT_PERF_PAGES, help=argparse.SUPPRESS)
    # Size of the per-socket map: a test knob, to overflow it on purpose.
    parser.add_argument("--max-sockets", type=_max_sockets, help=argparse.SUPPRESS)
    # BCC's own perf reader instead of the mmap one (the fallback for other
    # architectures): a test knob, so that the fallback runs in the tests.
    parser.add_argument("--bcc-reader", action="store_true", help=argparse.SUPPRESS)
    # Transitions into this state are dropped as if the kernel had skipped
    # them: a test knob, to check that gaps are found.
    parser.add_argument("--test-skip", type=state_list, metavar="STATE", help=argparse.SUPPRESS)
    # How many records may wait for journald (-Y): a test knob, to fill the
    # queue on purpose.
    parser.add_argument("--journal-queue", type=_journal_queue, default=JOURNAL_QUEUE,
                        help=argparse.SUPPRESS)
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.csv:
        parser.error("argument -j/--json: not allowed with argument -s/--csv")
    if args.metrics_by and not (args.metrics or args.metrics_file):
        parser.error("argument --metrics-by: needs --metrics or --metrics-file")
    if args.stuck_states and not args.stuck:
        parser.error("argument --stuck-states: only with --stuck")
    if args.lifecycle:
        # they would cut the histories short; --stuck rows have other columns
        for given, name in ((args.from_states, "--from"), (args.to_states, "--to"),
                            (args.min_span is not None, "--min-span"),
                            (args.stuck, "--stuck")):
            if given:
                parser.error("argument -l/--lifecycle: not allowed with argument %s" % name)
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

    # From here on a stop signal is a request, whenever it comes: during the
    # checks and the compile too, the run then ends at once, with a summary.
    stop = StopRequest()
    stop.install()
    tracer = exporter = None
    try:
        if args.metrics or args.metrics_file:
            import_prometheus_client(args)
        check_privileges()
        check_tracepoint()
        check_kernel_headers()
        sender = None
        if args.journal:
            check_journald()
            sender = JournalSocket()
        tracer = Tracer(args, sys.stdout, sender, stop=stop)
        if tracer.metrics is not None:
            # listening and writable before the compile and the attach
            exporter = MetricsExporter(args, tracer.metrics, tracer.warn)
            exporter.start()
        tracer.load()
        tracer.run()
    except BrokenPipeError:
        _quiet_stdout()
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
        if exporter is not None:
            exporter.close()
    tracer.warn(tracer.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
