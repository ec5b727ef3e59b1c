"""The one shared module of the tests: paths, sequences, made-up events
and the reference renderers for the unit tests, and for the live tests the
tool run as a child process, loopback connections, helper processes, the
load generator, and readers of the tool's output and of the journal.

Importable without root or BCC (it needs only tcpstates.py on sys.path,
which pytest.ini's pythonpath provides). Test modules import from here and
from nowhere else in tests/; nothing here reaches into bench/ but the load
generator's C source, compiled by path.
"""
import csv
import io
import json
import os
import queue
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import tcpstates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tcpstates.py")
TESTS = os.path.join(ROOT, "tests")
LOADGEN_SOURCE = os.path.join(ROOT, "bench", "loadgen.c")
# Programs the live tests run as processes of their own (not modules).
OWNER_PROCS = os.path.join(TESTS, "owner_procs.py")
SLOW_READER = os.path.join(TESTS, "slow_reader.py")
JOURNALD_DIES = os.path.join(TESTS, "journald_dies.py")
JOURNALD_RATELIMIT = os.path.join(TESTS, "journald_ratelimit.py")
JOURNALD_STALLS = os.path.join(TESTS, "journald_stalls.py")

CLIENT_SEQUENCE = [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"),
                   ("ESTABLISHED", "FIN_WAIT1"), ("FIN_WAIT1", "FIN_WAIT2"),
                   ("FIN_WAIT2", "CLOSE")]
ACCEPTED_SEQUENCE = [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"),
                     ("ESTABLISHED", "CLOSE_WAIT"), ("CLOSE_WAIT", "LAST_ACK"),
                     ("LAST_ACK", "CLOSE")]
LISTENER_SEQUENCE = [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")]
EVENTS_PER_SESSION = 12


# -- unit: events and a /proc made up for a test ----------------------------
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
    return tcpstates.Formatter(args_for(*argv), clock=clock, procs=procs or FakeProcs(),
                               reasons=tcpstates.Reasons(RESET_NAMES))


# -- unit: the reference renderers -----------------------------------------
# The plain statement of the output formats, which the fast row functions in
# tcpstates.py must match.
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
    if a.extended or a.reasons:
        values["REASON"] = reason_text(ev)
    if a.extended:
        values.update(zip(tcpstates.OWNER_TITLES, owner_texts(f, ev)))
    return [(title, values[title]) for title, conv in f.columns if conv is not None]


RESET_NAMES = {0: "NOT_SPECIFIED", 1: "NO_SOCKET", 8: "TCP_ABORT_ON_DATA",
               11: "TCP_ABORT_ON_CLOSE", 12: "TCP_ABORT_ON_LINGER", 14: "TCP_STATE",
               15: "TCP_KEEPALIVE_TIMEOUT", 16: "TCP_DISCONNECT_WITH_DATA"}


def reason_of(ev, names=RESET_NAMES):
    """The reason the plain (uncached) way."""
    ev = tcpstates.as_event(ev)
    return tcpstates.decide_reason(ev.oldstate, ev.newstate, ev.rflags, ev.rst_reason,
                                   ev.error, ev.retries, names)


def reason_text(ev):
    return reason_of(ev).text


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
        "reason": reason_of(ev).word,
        "errno": reason_of(ev).errno,
        "retries": reason_of(ev).retries,
        "reset_reason": reason_of(ev).reset,
    }


# -- live: processes and connections ----------------------------------------
def default_sigint():
    # A child of a non-interactive shell may inherit SIGINT as ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_HANDED_PORTS = set()


def free_port(family=socket.AF_INET):
    """A port below the ephemeral range (32768-60999) that is free now, and
    never handed out before in this process: a port a test only connects
    to (refused, unanswered) is free again at once, and two ends of one
    test must not share a port (the rows are told apart by port)."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    for _ in range(200):
        port = random.randint(20000, 32000)
        if port in _HANDED_PORTS:
            continue
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_PORTS.add(port)
        return port
    raise RuntimeError("no free test port")


class Session:
    def __init__(self, family, port, client_port):
        self.family = family
        self.port = port
        self.client_port = client_port


def tcp_session(family=socket.AF_INET, hold=0.0, port=None, payload=b"ping"):
    """One full connection on loopback: listen, connect, accept, exchange a
    little data, hold it open `hold` seconds, the client closes first."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    port = port or free_port(family)
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(8)
    cli = socket.socket(family, socket.SOCK_STREAM)
    cli.settimeout(5)
    cli.connect((host, port))
    acc, _ = srv.accept()
    acc.settimeout(5)
    client_port = cli.getsockname()[1]
    cli.sendall(payload)
    acc.recv(64)
    if hold:
        time.sleep(hold)
    cli.close()
    time.sleep(0.01)
    acc.close()
    srv.close()
    return Session(family, port, client_port)


def wait_for(predicate, timeout, step=0.02):
    """Poll predicate() until it is true or timeout seconds pass; its last
    answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def kill_quietly(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


class TracerRun:
    """tcpstates.py running as a child process, its stdout read by a thread;
    in the cgroup (a v2 directory) if given, from its first instruction."""

    def __init__(self, *args, ready_timeout=60, stdout=subprocess.PIPE, cgroup=None):
        self.args = list(args)

        def preexec():
            default_sigint()
            if cgroup:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
        self.proc = subprocess.Popen(
            [sys.executable, TOOL] + self.args, stdout=stdout,
            stderr=subprocess.PIPE, preexec_fn=preexec)
        self.lines = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.header = None
        if stdout is not subprocess.PIPE:
            return
        if "-j" in self.args or "--json" in self.args:
            self._probe_ready(ready_timeout)
            return
        if not self.wait_until(lambda ls: ls, ready_timeout):
            self.kill()
            raise AssertionError("tracer printed no header; stderr: %s" % self.stderr_text())
        self.header = self.lines[0]

    def _probe_ready(self, timeout):
        """JSON output has no header: readiness is shown by a failed connect
        to a closed port of ours appearing in the output (then forgotten)."""
        probe = free_port()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                try:
                    s.connect(("127.0.0.1", probe))
                except OSError:
                    pass
            if self.wait_until(lambda ls: any('"rport":%d,' % probe in l for l in ls), 0.3):
                with self._lock:
                    self.lines = [l for l in self.lines if '"rport":%d,' % probe not in l
                                  and '"lport":%d,' % probe not in l]
                return
            if self.proc.poll() is not None:
                break
        self.kill()
        raise AssertionError("tracer never showed a probe connection; stderr: %s"
                             % self.stderr_text())

    def _read(self):
        if self.proc.stdout is None:
            return
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def snapshot(self):
        with self._lock:
            return list(self.lines)

    def wait_until(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            if self.proc.poll() is not None:
                self._reader.join(2)
                return bool(predicate(self.snapshot()))
            time.sleep(0.02)
        return False

    def settle(self, count, want, timeout=30, quiet=1.0):
        """Wait until count(lines) reaches want, or stops growing for
        `quiet` seconds (events the kernel skipped never arrive)."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = count(self.snapshot())
            if n >= want:
                return n
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since > quiet:
                return n
            time.sleep(0.1)
        return count(self.snapshot())

    def stop(self, sig=signal.SIGINT, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("tracer did not stop within %ss of signal %s" % (timeout, sig))
        self._reader.join(5)
        self.stderr = self.proc.stderr.read().decode("utf-8", "replace")
        return self.proc.returncode

    def kill(self):
        kill_quietly(self.proc)

    def stderr_text(self):
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode("utf-8", "replace")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


class Proc:
    """A helper process speaking a line protocol (owner_procs.py): its
    stdout lines are read by a thread, so a read can time out. gated=True
    holds it, PID known, before it runs anything until release(): a tracer
    can be started on its PID first."""

    def __init__(self, argv, pass_fds=(), gated=False):
        gate_r = self._gate = None
        if gated:
            gate_r, self._gate = os.pipe()
            argv = [sys.executable, "-c", "import os, sys; os.read(%d, 1); "
                    "os.execv(sys.argv[1], sys.argv[1:])" % gate_r] + list(argv)
            pass_fds = tuple(pass_fds) + (gate_r,)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, pass_fds=pass_fds)
        if gated:
            os.close(gate_r)
        self.pid = self.proc.pid
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def release(self):
        os.write(self._gate, b"go")
        os.close(self._gate)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def read(self, timeout=10):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no answer from %s in %ss" % (self.proc.args, timeout))
        assert line is not None, "%s ended early" % (self.proc.args,)
        return line

    def ask(self, word, timeout=10):
        self.send(word)
        return self.read(timeout)

    def send(self, word):
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def finish(self):
        """Tell it to exit; wait until everything holding its stdout ended.
        Returns its exit status."""
        try:
            self.send("exit")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        self.reader.join(10)
        return self.proc.wait(10)

    def kill(self):
        kill_quietly(self.proc)


# -- live: the load generator ------------------------------------------------
def build_loadgen(directory):
    """Compile bench/loadgen.c into directory (with bench/common.py's gcc
    command) and return the program's path."""
    out = os.path.join(str(directory), "loadgen")
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", out, LOADGEN_SOURCE], check=True)
    return out


def run_load(loadgen, port, *args, cpu=None, timeout=120):
    """Run the load generator against port to its end (pinned to cpu if
    given); its JSON report."""
    argv = [loadgen, "-p", str(port)] + [str(a) for a in args]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + argv
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    # ("errors" are socket() calls refused with EMFILE when its server
    # falls behind: no connection was attempted, no event made.)
    result = json.loads(proc.stdout)
    assert result["connections"] > 0, result
    return result


# -- reading the output --------------------------------------------------------

SUMMARY = re.compile(r"tcpstates: summary: (?P<printed>\d+) printed, (?P<lost>\d+) lost, "
                     r"(?:up to )?(?P<skipped>\d+) skipped by the kernel, "
                     r"(?P<gaps>\d+) gaps, (?P<not_written>\d+) not written, (?P<late>\d+) late"
                     r"(?:, (?P<unsent>\d+) journal records not sent)?")


def summary(stderr):
    """The numbers of the exit summary, the last line of stderr."""
    lines = stderr.splitlines()
    m = SUMMARY.fullmatch(lines[-1]) if lines else None
    assert m, "no summary line in stderr: %r" % stderr
    return {k: int(v) for k, v in m.groupdict().items() if v is not None}


def parse_csv(lines):
    """Rows of CSV output (header first) as dicts, via the csv module."""
    reader = csv.DictReader(lines)
    return list(reader)


def table_rows(lines):
    """Table rows split on white space into dicts keyed by the header's
    titles (C-COMM must hold no spaces for this; the tests ensure it)."""
    header = lines[0].split()
    rows = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) == len(header):
            rows.append(dict(zip(header, parts)))
    return rows


def rows_for_port(rows, port):
    return [r for r in rows if r["LPORT"] == str(port) or r["RPORT"] == str(port)]


def wait_rows(tracer, ports, count, timeout=10):
    """Wait until the CSV output holds count rows of these ports (local or
    remote); those rows (all of them, if more came)."""
    def mine(lines):
        return [r for r in parse_csv(lines) if r["LPORT"] in ports or r["RPORT"] in ports]
    ports = {str(p) for p in ports}
    ok = tracer.wait_until(lambda ls: len(mine(ls)) >= count, timeout)
    rows = mine(tracer.snapshot())
    assert ok, "wanted %d rows, got %d:\n%s" % (count, len(rows), "\n".join(
        tracer.snapshot()[-30:]))
    return rows


def sockets_of(rows):
    """Rows grouped by SKADDR, in output order."""
    groups = {}
    for r in rows:
        groups.setdefault(r["SKADDR"], []).append(r)
    return groups


def transitions(rows):
    return [(r["OLDSTATE"], r["NEWSTATE"]) for r in rows]


def classify(rows, session):
    """Split a session's rows into client, accepted and listener sockets."""
    port = str(session.port)
    client = accepted = listener = None
    for skaddr, group in sockets_of(rows_for_port(rows, session.port)).items():
        if all(r["RPORT"] == port for r in group):
            client = group
        elif any(r["RPORT"] == "0" for r in group):
            listener = group
        else:
            accepted = group
    return client, accepted, listener


# -- the journal -----------------------------------------------------------------
def read_journal(pid, *match, file=None):
    """The tool's journal records from process pid (matching match), as
    dicts; from a journal file instead of the system's if given."""
    argv = ["journalctl", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=tcpstates",
            "_PID=%d" % pid] + list(match)
    if file:
        argv.insert(1, "--file=%s" % file)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    return [json.loads(l) for l in out.splitlines()]


def cgroup2_root(mountinfo="/proc/self/mountinfo"):
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid host), or None."""
    with open(mountinfo) as f:
        for line in f:
            before, _, after = line.partition(" - ")
            if after.split()[:1] == ["cgroup2"]:
                return before.split()[4]
    return None


_TIME_UNITS = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 10 ** 6, "sec": 10 ** 6,
               "": 10 ** 6, "min": 60 * 10 ** 6, "h": 3600 * 10 ** 6}


def unit_rate_limit_exports(unit_text, unit="tcpstates.service"):
    """What systemd (PID 1) tells journald of a unit's LogRateLimitIntervalSec=
    and LogRateLimitBurst=: {path: value} of the symlinks it makes in
    /run/systemd/units/ when it starts the unit, which journald reads for
    the unit's messages. A setting that is 0 or absent is not exported
    (src/core/unit.c, unit_export_log_ratelimit_interval and _burst):
    journald's own defaults then apply."""
    settings = dict(re.findall(r"^(LogRateLimit\w+)=(.*)$", unit_text, re.M))
    exports = {}
    interval = settings.get("LogRateLimitIntervalSec", "").strip()
    if interval:
        m = re.fullmatch(r"(\d+)\s*([a-z]*)", interval)
        usec = int(m.group(1)) * _TIME_UNITS[m.group(2)]
        if usec:
            exports["/run/systemd/units/log-rate-limit-interval:" + unit] = str(usec)
    burst = int(settings.get("LogRateLimitBurst", "0") or 0)
    if burst:
        exports["/run/systemd/units/log-rate-limit-burst:" + unit] = str(burst)
    return exports


def run_private_journal(script, *args, setup="", timeout=120):
    """Run one of the tests' scripts (which start a journald of their own)
    in a private mount namespace, with tmpfs over /run and /var/log/journal
    (when the host has one): the host's journal, sockets and directories
    stay untouched. setup: more shell commands to run first. In its own
    process group, killed whole at the end, so that nothing it started is
    left running after a timeout. The script imports helpers, which imports
    the tool: the root is on its PYTHONPATH. Returns (returncode, stdout,
    stderr)."""
    shell = ("mount -t tmpfs -o size=256m tmpfs /run || exit 9; "
             "if [ -d /var/log/journal ]; then "
             "mount -t tmpfs -o size=256m tmpfs /var/log/journal || exit 9; fi; "
             + setup + 'exec "$0" "$@"')
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", shell,
                             sys.executable, script] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode, out, err


def wait_journal(pid, count, *match, timeout=10):
    """read_journal until it holds count records or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_journal(pid, *match)
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


# -- live: connections that end for each reason ----------------------------------
def refused_connect(family=socket.AF_INET, port=None):
    """A connect to a port nobody listens on; the port."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    port = port or free_port(family)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return port
    raise AssertionError("connect to port %d was not refused" % port)


def server_closes(how, port=None):
    """A loopback connection whose accepted socket is closed by its process
    ("linger": with SO_LINGER 0; "unread": with the client's data unread);
    the client sees the reset on its next read, then closes. Returns a
    Session."""
    port = port or free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(8)
    cli = socket.socket()
    cli.settimeout(5)
    cli.connect(("127.0.0.1", port))
    acc, _ = srv.accept()
    cli.sendall(b"ping")
    if how == "linger":
        assert acc.recv(64) == b"ping"
        acc.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        time.sleep(0.05)            # the data has arrived, and is never read
    acc.close()
    try:
        cli.recv(64)
        raise AssertionError("the client saw no reset")
    except ConnectionResetError:
        pass
    cli.close()
    srv.close()
    return Session(socket.AF_INET, port, None)


# In a private network namespace (gone with its process): a veth pair whose
# far end is unconfigured, so that nothing answers. "timeout": a static
# neighbour, one SYN retry allowed (about 3 s); "unreachable": a neighbour
# that never answers ARP, asked once after 100 ms, then the kernel reports
# EHOSTUNREACH to the connecting socket.
NETNS_SETUP = """set -e
ip link set lo up
ip link add v0 type veth peer name v1
ip link set v0 up
ip link set v1 up
ip addr add 10.98.0.1/24 dev v0
"""
NETNS_CASES = {
    "timeout": """ip route add 10.99.0.0/16 via 10.98.0.2 dev v0
ip neigh add 10.98.0.2 lladdr 02:00:00:00:00:02 dev v0
sysctl -qw net.ipv4.tcp_syn_retries=1
""",
    "unreachable": """ip route add 10.99.0.0/16 via 10.98.0.3 dev v0
sysctl -qw net.ipv4.neigh.v0.mcast_solicit=1 net.ipv4.neigh.v0.ucast_solicit=0 \\
    net.ipv4.neigh.v0.app_solicit=0 net.ipv4.neigh.v0.retrans_time_ms=100
""",
}
NETNS_CONNECT = """import errno, socket, sys
s = socket.socket()
s.settimeout(30)
try:
    s.connect(("10.99.0.1", int(sys.argv[1])))
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
else:
    print("connected")
"""


def netns_connect(case, port):
    """Connect to 10.99.0.1:port from a private network namespace set up for
    case; the errno name connect() failed with."""
    script = NETNS_SETUP + NETNS_CASES[case] + 'exec %s -c "$0" %d\n' % (sys.executable, port)
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script, NETNS_CONNECT],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()
