"""Helpers for live tests: run the tool, make loopback TCP connections."""
import csv
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tcpstates.py")

CLIENT_SEQUENCE = [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"),
                   ("ESTABLISHED", "FIN_WAIT1"), ("FIN_WAIT1", "FIN_WAIT2"),
                   ("FIN_WAIT2", "CLOSE")]
ACCEPTED_SEQUENCE = [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"),
                     ("ESTABLISHED", "CLOSE_WAIT"), ("CLOSE_WAIT", "LAST_ACK"),
                     ("LAST_ACK", "CLOSE")]
LISTENER_SEQUENCE = [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")]
EVENTS_PER_SESSION = 12


def default_sigint():
    # A child of a non-interactive shell may inherit SIGINT as ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port(family=socket.AF_INET):
    """A port below the ephemeral range (32768-60999) that is free now."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
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


class TracerRun:
    """tcpstates.py running as a child process, its stdout read by a thread."""

    def __init__(self, *args, ready_timeout=60, stdout=subprocess.PIPE):
        self.args = list(args)
        self.proc = subprocess.Popen(
            [sys.executable, TOOL] + self.args, stdout=stdout,
            stderr=subprocess.PIPE, preexec_fn=default_sigint)
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
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr_text(self):
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode("utf-8", "replace")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


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
