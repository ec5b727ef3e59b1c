"""The plain statement of the output formats, which the fast row functions
in tcpstates.py must match (the tests check), and events and a /proc made
up for unit tests. No root, no BCC."""
import csv
import io
import socket

import tcpstates


def make_event(**kw):
    fields = dict(ts_ns=5_000_000_000, skaddr=0xffff888102ed1280, span_us=300206,
                  pid=4242, opid=4242, lport=41365, rport=46400,
                  laddr=socket.inet_pton(socket.AF_INET, "127.0.0.1") + b"\0" * 12,
                  raddr=socket.inet_pton(socket.AF_INET, "10.1.2.3") + b"\0" * 12,
                  family=socket.AF_INET, oldstate=1, newstate=4,
                  flags=tcpstates.SPAN_KNOWN | tcpstates.OWNER_KNOWN,
                  comm=b"curl".ljust(16, b"\0"), ocomm=b"curl".ljust(16, b"\0"),
                  osince=4_000_000_000)
    fields.update(kw)
    return tcpstates.Event(**fields)


def v6_event(**kw):
    return make_event(family=socket.AF_INET6,
                      laddr=socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
                      raddr=socket.inet_pton(socket.AF_INET6, "fe80::abcd:ef01:2345:6789"),
                      **kw)


def args_for(*argv):
    return tcpstates.parse_args(list(argv))


class FakeProcs(tcpstates.ProcessCache):
    """A /proc made up for a test: {pid: (start_ns, name, cgroup)}, or a
    function pid -> that or None. A PID not in it has exited. By default
    every PID runs, started at 0, named "curl" (make_event's name)."""

    def __init__(self, table=None, name="curl", cgroup="/system.slice/curl.service"):
        self.table = table
        self.default = (0, name, cgroup)

    def get(self, pid):
        if self.table is None:
            return self.default
        if callable(self.table):
            return self.table(pid) or self.GONE
        return self.table.get(pid, self.GONE)


def formatter(*argv, clock=None, procs=None):
    return tcpstates.Formatter(args_for(*argv), clock=clock, procs=procs or FakeProcs())


# -- the reference renderers ----------------------------------------------------
def owner_texts(f, ev):
    owner = f.procs.owner(ev)
    if owner is None:
        return [tcpstates.UNKNOWN] * 4
    return [str(owner[0]), owner[1], owner[2], owner[3]]


def reference_fields(f, ev):
    """Every shown column of one row as text, field by field."""
    ev = tcpstates.as_event(ev)
    a = f.args
    values = {
        "TIME": f.clock.hms(ev.ts_ns) if a.time else None,
        "TIME(s)": "%.6f" % f.clock.since_first(ev.ts_ns) if a.timestamp else None,
        "SKADDR": "%x" % ev.skaddr, "C-PID": str(ev.pid), "C-COMM": tcpstates.comm_text(ev.comm),
        "IP": tcpstates.ip_version(ev.family),
        "LADDR": tcpstates.address_text(ev.family, ev.laddr), "LPORT": str(ev.lport),
        "RADDR": tcpstates.address_text(ev.family, ev.raddr), "RPORT": str(ev.rport),
        "OLDSTATE": tcpstates.state_name(ev.oldstate), "->": "->",
        "NEWSTATE": tcpstates.state_name(ev.newstate), "MS": "%.3f" % (ev.span_us / 1000),
    }
    if a.extended:
        values.update(zip(tcpstates.OWNER_TITLES, owner_texts(f, ev)))
    return [(title, values[title]) for title, conv in f.columns if conv is not None]


def defuse(text):
    if text[:1] in tcpstates.FORMULA_STARTS and text != tcpstates.UNKNOWN:
        return "'" + text
    return text


def reference_row(f, ev):
    if f.mode == "json":
        raise ValueError("JSON is checked with json_record")
    fields = reference_fields(f, ev)
    if f.mode == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(
            [defuse(v) if t in ("C-COMM", "O-COMM", "CGROUP") else v for t, v in fields])
        return out.getvalue()
    convs = dict(f.columns)
    return " ".join(tcpstates._title_conversion(convs[t]) % v for t, v in fields) + "\n"


def json_record(f, ev):
    """Every field the tool knows, as the dict one JSON line holds."""
    ev = tcpstates.as_event(ev)
    owner = f.procs.owner(ev)
    return {
        "time": f.clock.rfc3339(ev.ts_ns),
        "elapsed": round(f.clock.since_first(ev.ts_ns), 6),
        "skaddr": "%x" % ev.skaddr,
        "ip": 4 if ev.family == socket.AF_INET else 6,
        "laddr": tcpstates.address_text(ev.family, ev.laddr),
        "lport": ev.lport,
        "raddr": tcpstates.address_text(ev.family, ev.raddr),
        "rport": ev.rport,
        "oldstate": tcpstates.state_name(ev.oldstate),
        "newstate": tcpstates.state_name(ev.newstate),
        "span_us": ev.span_us if ev.flags & tcpstates.SPAN_KNOWN else None,
        "pid": ev.pid,
        "comm": tcpstates.comm_text(ev.comm),
        "owner_pid": owner[0] if owner else None,
        "owner_comm": owner[1] if owner else None,
        "owner_from": owner[2] if owner else None,
        "owner_cgroup": owner[3] if owner else None,
    }
