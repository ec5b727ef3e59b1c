"""-Y: structured journal records, the service unit, the catalog, and
forwarding to a central journal."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import helpers
import tcpstates
from helpers import (ROOT, TOOL, FakeProcs, TracerRun, make_event, parse_csv, read_journal,
                     rows_for_port, tcp_session, v6_event, wait_journal)

UNDERSCORE = re.compile(r"^_")


def fields_of(ev, procs=None):
    clock = tcpstates.Clock()
    clock.wall_minus_mono = 1_000_000_000_000
    return tcpstates.journal_fields(ev, clock, (procs or FakeProcs()).owner(ev))


# -- unit --------------------------------------------------------------------
def test_ipv4_record():
    f = fields_of(make_event())
    assert f == {
        "MESSAGE": "curl[4242]: 127.0.0.1:41365 \u2192 10.1.2.3:46400 ESTABLISHED \u2192 "
                   "FIN_WAIT1 after 300.206 ms",
        "MESSAGE_ID": tcpstates.JOURNAL_MESSAGE_ID,
        "PRIORITY": "5",
        "SYSLOG_IDENTIFIER": "tcpstates",
        "OBJECT_PID": "4242",
        "TCPSTATES_OWNER_PID": "4242",
        "TCPSTATES_OWNER_COMM": "curl",
        "TCPSTATES_OWNER_FROM": "self",
        "OBJECT_IPV4_SOURCE_ADDRESS": "127.0.0.1",
        "OBJECT_TCP_SOURCE_PORT": "41365",
        "OBJECT_IPV4_DESTINATION_ADDRESS": "10.1.2.3",
        "OBJECT_TCP_DESTINATION_PORT": "46400",
        "OBJECT_TCP_OLD_STATE": "ESTABLISHED",
        "OBJECT_TCP_NEW_STATE": "FIN_WAIT1",
        "OBJECT_TCP_SPAN_TIME": "300206",
        "TCPSTATES_SOCKET": "ffff888102ed1280",
        "TCPSTATES_IP_VERSION": "4",
        "TCPSTATES_EVENT_REALTIME_USEC": "1005000000",
        "TCPSTATES_EVENT_MONOTONIC_USEC": "5000000",
        "TCPSTATES_ONCPU_PID": "4242",
        "TCPSTATES_ONCPU_COMM": "curl",
    }


def test_ipv6_record_has_real_addresses():
    f = fields_of(v6_event())
    assert f["OBJECT_IPV6_SOURCE_ADDRESS"] == "2001:db8::1"
    assert f["OBJECT_IPV6_DESTINATION_ADDRESS"] == "fe80::abcd:ef01:2345:6789"
    assert "OBJECT_IPV4_SOURCE_ADDRESS" not in f
    assert f["TCPSTATES_IP_VERSION"] == "6"
    assert "[2001:db8::1]:41365 \u2192 [fe80::abcd:ef01:2345:6789]:46400" in f["MESSAGE"]


def test_unknown_owner_and_span_are_left_out_not_zero():
    f = fields_of(make_event(flags=0, opid=0, pid=0, comm=b"swapper/1".ljust(16, b"\0")))
    assert "OBJECT_PID" not in f and "TCPSTATES_OWNER_COMM" not in f
    assert "TCPSTATES_OWNER_PID" not in f and "TCPSTATES_OWNER_FROM" not in f
    assert "OBJECT_TCP_SPAN_TIME" not in f
    assert f["TCPSTATES_ONCPU_PID"] == "0" and f["TCPSTATES_ONCPU_COMM"] == "swapper/1"
    assert f["MESSAGE"].startswith("unknown owner: ") and "after" not in f["MESSAGE"]


@pytest.mark.parametrize("name", [b"\x1b[31mred", b"a\nMESSAGE=x", b"\xff\xfe", b"=1+1"])
def test_hostile_names_in_records(name):
    f = fields_of(make_event(comm=name.ljust(16, b"\0"), ocomm=name.ljust(16, b"\0")))
    for key, value in f.items():
        assert re.fullmatch(r"[A-Z0-9_]+", key) and not key.startswith("_")
        assert "\n" not in value and "\x1b" not in value, (key, value)
    assert f["TCPSTATES_ONCPU_COMM"] == tcpstates.comm_text(name.ljust(16, b"\0"))


def test_exited_owner_keeps_its_pid_but_not_object_pid():
    """OBJECT_PID makes journald attach that PID's unit and executable: only
    while the owner itself still runs, never a stranger that got its PID."""
    f = fields_of(make_event(), FakeProcs({}))
    assert "OBJECT_PID" not in f
    assert f["TCPSTATES_OWNER_PID"] == "4242" and f["TCPSTATES_OWNER_FROM"] == "self"
    inherited = make_event(flags=tcpstates.OWNER_KNOWN | tcpstates.OWNER_INHERITED)
    assert "TCPSTATES_OWNER_PID" not in fields_of(inherited, FakeProcs({}))
    assert fields_of(inherited)["TCPSTATES_OWNER_FROM"] == "listener"


def test_no_field_is_journalds_own():
    for ev in (make_event(), v6_event(), make_event(flags=0)):
        assert not [k for k in fields_of(ev) if k.startswith("_")]


def parse_entry(data):
    """A native-protocol datagram back into {field: value}, both forms."""
    fields, i = {}, 0
    while i < len(data):
        line_end = data.index(b"\n", i)
        line = data[i:line_end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = line_end + 1
        else:
            key = line
            size = int.from_bytes(data[line_end + 1:line_end + 9], "little")
            value = data[line_end + 9:line_end + 9 + size]
            assert data[line_end + 9 + size:line_end + 10 + size] == b"\n"
            i = line_end + 10 + size
        assert key.decode() not in fields
        fields[key.decode()] = value.decode()
    return fields


OWNERS = {
    "running": FakeProcs(),
    "exited": FakeProcs({}),
    "hostile": FakeProcs(name="a\\x1b[31m \u2192 x", cgroup="/system.slice/x.service"),
}
EVENTS = [
    make_event(), v6_event(), make_event(flags=0), make_event(flags=tcpstates.OWNER_KNOWN),
    make_event(flags=tcpstates.OWNER_KNOWN | tcpstates.OWNER_INHERITED),
    v6_event(flags=tcpstates.SPAN_KNOWN), make_event(oldstate=14, newstate=99, span_us=0),
    make_event(comm=b"\xff\x1b]0;x\n".ljust(16, b"\0"), lport=0, rport=65535),
    make_event(span_us=2 ** 40 + 7, ts_ns=2 ** 62 + 12345, skaddr=2 ** 64 - 1),
    # moves to CLOSE, with and without what the kernel said of them
    make_event(oldstate=2, newstate=7, rflags=tcpstates.R_RST_RECEIVED | tcpstates.R_ERRNO
               | tcpstates.R_RETRIES, error=111),
    v6_event(oldstate=1, newstate=7, rflags=tcpstates.R_RST_SENT | tcpstates.R_RST_REASON,
             rst_reason=14, flags=0),
    make_event(oldstate=1, newstate=7, rflags=tcpstates.R_ERRNO, error=104),
    make_event(oldstate=2, newstate=7, rflags=tcpstates.R_ERRNO | tcpstates.R_RETRIES,
               error=110, retries=6),
    make_event(oldstate=10, newstate=7), make_event(oldstate=4, newstate=7),
]


@pytest.mark.parametrize("owners", sorted(OWNERS))
@pytest.mark.parametrize("index", range(len(EVENTS)))
def test_fast_records_are_journal_fields(owners, index):
    """What is sent is the plain statement, journal_fields, to the byte."""
    clock = tcpstates.Clock()
    clock.wall_minus_mono = 1_700_000_000_123_456_789
    procs = OWNERS[owners]
    ev = EVENTS[index]
    from helpers import RESET_NAMES
    reasons = tcpstates.Reasons(RESET_NAMES)
    sent = tcpstates.journal_entry_function(clock, procs.owner, reasons)(tuple(ev))
    expected = tcpstates.journal_fields(ev, clock, procs.owner(ev), reasons(ev))
    assert list(parse_entry(sent).items()) == list(expected.items())
    assert sent == tcpstates.native_entry(expected)


def test_native_entry_binary_form_for_newlines():
    data = tcpstates.native_entry({"MESSAGE": "two\nlines", "PRIORITY": "4", "X": "\u2192"})
    assert data == (b"MESSAGE\n" + (9).to_bytes(8, "little") + b"two\nlines\n"
                    b"PRIORITY=4\nX=\xe2\x86\x92\n")
    assert parse_entry(data) == {"MESSAGE": "two\nlines", "PRIORITY": "4", "X": "\u2192"}


def test_writer_uses_the_injected_sender():
    sent = []
    writer = tcpstates.JournalWriter(tcpstates.Clock(), FakeProcs(), sent.append)
    writer.events([tuple(make_event())])
    first = parse_entry(sent[0])
    assert first["MESSAGE"].startswith("curl[4242]: ")
    assert first["OBJECT_PID"] == "4242" and first["OBJECT_TCP_SPAN_TIME"] == "300206"
    writer.lost(3, 10, 0, 0, 5, 8)
    loss = parse_entry(sent[1])
    assert loss["TCPSTATES_LOST"] == "3" and loss["PRIORITY"] == "4"
    assert loss["TCPSTATES_UNSENT"] == "5" and loss["TCPSTATES_UNSENT_TOTAL"] == "8"
    assert loss["MESSAGE_ID"] == tcpstates.JOURNAL_LOST_MESSAGE_ID
    assert "could not send 5 records to the journal (8 since start)" in loss["MESSAGE"]
    assert writer.unsent == 0 and writer.sent == 1        # loss records are not counted


def test_lost_record_of_unsent_alone():
    f = tcpstates.lost_fields(0, 0, 0, 0, 7, 9)
    assert f["MESSAGE"] == ("tcpstates could not send 7 records to the journal (9 since "
                            "start): the journal has a gap")


def test_writer_counts_failures_and_warns_once():
    def down(record):
        raise ConnectionRefusedError(111, "Connection refused")
    writer = tcpstates.JournalWriter(tcpstates.Clock(), FakeProcs(), down)
    writer.events([tuple(make_event())] * 5)
    assert writer.unsent == 5 and writer.failed == 5
    assert "Connection refused" in writer.warning()
    assert writer.warning() is None


class Gate:
    """A sender that holds every record until opened; records what it got,
    and the signals blocked in the thread that called it."""

    def __init__(self):
        self.open = threading.Event()
        self.got = []
        self.blocked = None

    def __call__(self, record):
        self.blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        if not self.open.wait(0.01):
            return False            # journald's queue is full: try again
        self.got.append(record)
        return True


class Stop:
    deadline = None


def test_sender_thread_queue_overflow_is_counted():
    gate = Gate()
    writer = tcpstates.JournalWriter(tcpstates.Clock(), FakeProcs(), gate, limit=4)
    writer.start()
    try:
        writer.events([tuple(make_event(skaddr=n)) for n in range(10)])
        assert writer.dropped == 6 and writer.unsent == 6
        writer.lost(0, 0, 0, 0, 6, 6)             # a loss record always fits
        assert writer.dropped == 6
        # The stop signals go to the main thread, never to the sender.
        assert helpers.wait_for(lambda: gate.blocked is not None, 5)
        assert set(tcpstates.STOP_SIGNALS) <= gate.blocked
        gate.open.set()
        writer.finish(Stop())                     # no stop: waits for all
    finally:
        writer.close()
    assert [parse_entry(r)["TCPSTATES_SOCKET"] for r in gate.got[:4]] == ["0", "1", "2", "3"]
    assert "TCPSTATES_UNSENT" in parse_entry(gate.got[4])
    assert writer.sent == 4 and writer.unsent == 6 and writer.handed == 10


def test_sender_gives_up_at_the_stop_deadline_and_counts_what_is_left():
    gate = Gate()                                 # never opened: journald stuck
    writer = tcpstates.JournalWriter(tcpstates.Clock(), FakeProcs(), gate)
    writer.start()
    writer.events([tuple(make_event())] * 100)
    stop = Stop()
    stop.deadline = time.monotonic() + 0.3
    began = time.monotonic()
    writer.finish(stop)
    assert time.monotonic() - began < 1.5
    assert not writer._thread.is_alive()
    assert writer.sent == 0 and writer.unsent == 100


def test_at_a_normal_end_a_stuck_journald_is_given_up_after_it_takes_nothing(monkeypatch):
    """--duration or --count (no stop signal, no deadline): the wait lasts
    while journald takes records, and ends once it has taken none for
    JOURNAL_STALL_S; what is left is counted."""
    monkeypatch.setattr(tcpstates, "JOURNAL_STALL_S", 0.3)
    got = []

    def slow_then_stuck(record):
        # journald takes 10 records, one every 50 ms, then none
        if len(got) >= 10:
            return False
        time.sleep(0.05)
        got.append(record)
        return True
    writer = tcpstates.JournalWriter(tcpstates.Clock(), FakeProcs(), slow_then_stuck)
    writer.start()
    writer.events([tuple(make_event())] * 100)
    began = time.monotonic()
    writer.finish(Stop())
    took = time.monotonic() - began
    # 0.5 s taking records (waited for), then 0.3 s taking none
    assert 0.7 < took < 2.0, took
    assert not writer._thread.is_alive()
    assert writer.sent == len(got) == 10 and writer.unsent == 90


def test_a_failure_is_kept_without_its_traceback():
    """Kept for the warning (and, in JournalSocket, raised again for every
    record while journald is away): with its traceback it would keep the
    frames of a failed send, with their records, alive."""
    def down(record):
        raise ConnectionRefusedError(111, "Connection refused")
    writer = tcpstates.JournalWriter(tcpstates.Clock(), FakeProcs(), down)
    writer.events([tuple(make_event())] * 3)
    assert writer.error.__traceback__ is None and writer.error.errno == 111
    sock = tcpstates.JournalSocket("/nonexistent/socket")
    for _ in range(3):
        with pytest.raises(FileNotFoundError) as raised:
            sock(b"MESSAGE=x\n")
        assert raised.value is not sock.error
    assert sock.error.__traceback__ is None


def test_journal_socket_sends_backs_off_and_finds_a_new_journald(tmp_path, monkeypatch):
    path = str(tmp_path / "socket")
    monkeypatch.setattr(tcpstates, "JOURNAL_RETRY_S", 0)

    def listen():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        return sock
    journald = listen()
    sender = tcpstates.JournalSocket(path)
    assert sender(b"A=1\n") is True
    assert journald.recv(100) == b"A=1\n"
    # Nobody reads: the socket queue fills, and the sender says so at once.
    results = [sender(b"B=%d\n" % n) for n in range(2000)]
    assert results[0] is True and results[-1] is False
    # journald goes away: an error; a new one at the same path is found.
    journald.close()
    with pytest.raises(OSError):
        sender(b"C=1\n")
    os.unlink(path)
    with pytest.raises(OSError):                  # nothing listens yet
        sender(b"C=2\n")
    journald = listen()
    assert sender(b"C=3\n") is True
    assert journald.recv(100) == b"C=3\n"
    sender.close()
    journald.close()


def test_y_does_not_need_python_systemd(monkeypatch):
    """-Y speaks journald's protocol itself: python-systemd is not needed."""
    monkeypatch.setitem(sys.modules, "systemd", None)
    for check in ("check_privileges", "check_tracepoint", "check_kernel_headers",
                  "check_journald"):
        monkeypatch.setattr(tcpstates, check, lambda: None)
    ran = []
    monkeypatch.setattr(tcpstates.Tracer, "load", lambda self: None)
    monkeypatch.setattr(tcpstates.Tracer, "run", lambda self: ran.append(self.journal))
    monkeypatch.setattr(tcpstates.Tracer, "warn", lambda self, message: None)
    assert tcpstates.main(["-Y"]) == 0
    assert isinstance(ran[0].sender, tcpstates.JournalSocket)


# -- unit file, catalog, install -------------------------------------------
@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`make install` into a scratch root that also holds the system's units."""
    dest = tmp_path_factory.mktemp("root")
    proc = subprocess.run(["make", "-s", "-C", ROOT, "install", "DESTDIR=%s" % dest],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dest


def test_install_puts_files_where_a_distribution_would(installed):
    for path in ("usr/sbin/tcpstates", "usr/share/man/man8/tcpstates.8",
                 "usr/lib/systemd/system/tcpstates.service",
                 "usr/lib/systemd/system/tcpstates-metrics.service",
                 "usr/lib/systemd/catalog/tcpstates.catalog",
                 "var/lib/systemd/catalog/database"):
        assert (installed / path).exists(), path
    assert os.access(installed / "usr/sbin/tcpstates", os.X_OK)


def verify_unit(root, unit, manpath):
    """systemd-analyze verify, with `man` looking only in `manpath`: it runs
    `man tcpstates(8)` for Documentation=, which ignores --root."""
    env = dict(os.environ, MANPATH=str(manpath))
    return subprocess.run(["systemd-analyze", "--root=%s" % root, "verify", str(unit)],
                          capture_output=True, text=True, env=env)


def units_beside_the_systems(installed):
    """The installed units' directory, with the system's own units copied in
    (those they name must exist for systemd-analyze verify)."""
    if shutil.which("man") is None:
        pytest.skip("no man (package man-db): Documentation=man:tcpstates(8) cannot be checked")
    units = installed / "usr/lib/systemd/system"
    for unit in os.listdir("/lib/systemd/system"):
        src = os.path.join("/lib/systemd/system", unit)
        if not (units / unit).exists() and os.path.isfile(src):
            shutil.copy(src, units / unit)
    return units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_file_verifies_clean(installed, tmp_path):
    units = units_beside_the_systems(installed)
    manpath = installed / "usr/share/man"
    # The installed page is the one man finds, not a copy elsewhere.
    found = subprocess.run(["man", "-w", "8", "tcpstates"], capture_output=True, text=True,
                           env=dict(os.environ, MANPATH=str(manpath)))
    assert found.stdout.strip() == str(manpath / "man8/tcpstates.8"), found.stderr
    proc = verify_unit(installed, units / "tcpstates.service", manpath)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # The doc link is really checked: without the page, verify fails.
    (tmp_path / "man").mkdir()
    proc = verify_unit(installed, units / "tcpstates.service", tmp_path / "man")
    assert proc.returncode != 0
    assert "man tcpstates(8)" in proc.stderr, proc.stderr
    unit = (units / "tcpstates.service").read_text()
    assert "ExecStart=/usr/sbin/tcpstates -Y\n" in unit
    # stdout would reach the journal too: each event stored twice.
    assert "StandardOutput=null\n" in unit
    # journald's per-unit rate limit would drop records uncounted; a 0
    # would not reach journald at all (see unit_rate_limit_exports)
    exported = helpers.unit_rate_limit_exports(unit)
    assert sorted(exported.values()) == ["1000000", "1000000"], exported
    # the program cache must be writable under ProtectSystem=strict
    assert "CacheDirectory=tcpstates\n" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_metrics_unit_verifies_clean(installed):
    units = units_beside_the_systems(installed)
    proc = verify_unit(installed, units / "tcpstates-metrics.service",
                       installed / "usr/share/man")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    unit = (units / "tcpstates-metrics.service").read_text()
    assert "ExecStart=/usr/sbin/tcpstates --quiet --metrics 127.0.0.1:9977\n" in unit
    # tcpstates.service's hardening, but for the families the HTTP server needs
    base = (units / "tcpstates.service").read_text()
    def hardening(text):
        return {l for l in text.splitlines() if l and not l.startswith("#") and
                l.split("=")[0] not in ("Description", "ExecStart", "After",
                                        "RestrictAddressFamilies")}
    assert hardening(unit) == hardening(base)
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n" in unit


def test_catalog_lists_both_message_ids(installed):
    out = subprocess.run(["journalctl", "--root=%s" % installed, "--list-catalog"],
                         capture_output=True, text=True).stdout
    assert tcpstates.JOURNAL_MESSAGE_ID in out and tcpstates.JOURNAL_LOST_MESSAGE_ID in out


# -- live ------------------------------------------------------------------
def check_client_records(records, session, owner_pid):
    """Every field of the client socket's five records."""
    v = "IPV4" if session.family == socket.AF_INET else "IPV6"
    host = "127.0.0.1" if session.family == socket.AF_INET else "::1"
    mine = [r for r in records if r.get("OBJECT_TCP_DESTINATION_PORT") == str(session.port)]
    assert [(r["OBJECT_TCP_OLD_STATE"], r["OBJECT_TCP_NEW_STATE"]) for r in mine] == \
        helpers.CLIENT_SEQUENCE
    for r in mine:
        assert r["MESSAGE_ID"] == tcpstates.JOURNAL_MESSAGE_ID and r["PRIORITY"] == "5"
        assert r["OBJECT_%s_SOURCE_ADDRESS" % v] == host
        assert r["OBJECT_%s_DESTINATION_ADDRESS" % v] == host
        assert r["OBJECT_PID"] == str(owner_pid)       # the owner, never 0
        assert r["TCPSTATES_OWNER_COMM"] == "python3"
        assert r["TCPSTATES_IP_VERSION"] == ("4" if v == "IPV4" else "6")
        assert re.fullmatch(r"[0-9a-f]+", r["TCPSTATES_SOCKET"])
        assert abs(int(r["TCPSTATES_EVENT_REALTIME_USEC"]) - int(r["__REALTIME_TIMESTAMP"])) < 5e6
        assert int(r["TCPSTATES_EVENT_MONOTONIC_USEC"]) > 0
        assert "TCPSTATES_ONCPU_PID" in r and "TCPSTATES_ONCPU_COMM" in r
        assert r["OBJECT_COMM"] == "python3"           # journald's, from OBJECT_PID
        assert not [k for k in r if k.startswith("OBJECT_IPV4" if v == "IPV6" else "OBJECT_IPV6")]
    assert [r["OBJECT_TCP_SOURCE_PORT"] for r in mine] == ["0"] + [str(session.client_port)] * 4
    assert "OBJECT_TCP_SPAN_TIME" not in mine[0]
    assert 250_000 <= int(mine[2]["OBJECT_TCP_SPAN_TIME"]) <= 700_000
    assert mine[2]["MESSAGE"].startswith("python3[%d]: " % owner_pid)
    assert "ESTABLISHED \u2192 FIN_WAIT1 after " in mine[2]["MESSAGE"]
    return mine


@pytest.mark.usefixtures("journald")
def test_records_reach_journald_ipv4_and_ipv6():
    with TracerRun("-Y", "-s") as tracer:
        sessions = [tcp_session(socket.AF_INET, hold=0.25), tcp_session(socket.AF_INET6, hold=0.25)]
        for s in sessions:
            assert tracer.wait_until(
                lambda ls: len(rows_for_port(parse_csv(ls), s.port)) >= 12, 10)
        time.sleep(0.2)
        assert tracer.stop() == 0
    assert helpers.summary(tracer.stderr)["unsent"] == 0
    for s in sessions:
        records = wait_journal(tracer.proc.pid, 12, "OBJECT_TCP_DESTINATION_PORT=%d" % s.port)
        check_client_records(records, s, os.getpid())
    # one record per printed event, no more
    printed = len(tracer.snapshot()) - 1
    assert len(read_journal(tracer.proc.pid)) == printed


@pytest.mark.usefixtures("journald")
def test_service_style_run_discards_stdout_but_records_everything():
    probe = helpers.free_port()
    port = helpers.free_port()
    while port == probe:
        port = helpers.free_port()
    proc = subprocess.Popen([sys.executable, TOOL, "-Y", "-L", "%d,%d" % (probe, port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=helpers.default_sigint)
    try:
        # Ready when a probe connection shows up; the tracer may attach in
        # the middle of one, so the probe's records are not counted.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            tcp_session(port=probe)
            if wait_journal(proc.pid, 1, "OBJECT_TCP_SOURCE_PORT=%d" % probe, timeout=0.3):
                break
        assert read_journal(proc.pid), "tracer never recorded a probe connection"
        # One whole session on a fresh port, traced from its start.
        tcp_session(port=port)
        records = wait_journal(proc.pid, 7, "OBJECT_TCP_SOURCE_PORT=%d" % port)
        time.sleep(0.3)                           # nothing more may come
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=10)[1].decode()
    assert proc.returncode == 0, err
    records = read_journal(proc.pid, "OBJECT_TCP_SOURCE_PORT=%d" % port)
    # -L: the listener (2) and the accepted socket (5); the client's local
    # port is an ephemeral one.
    by_socket = {}
    for r in records:
        by_socket.setdefault(r["TCPSTATES_SOCKET"], []).append(
            (r["OBJECT_TCP_OLD_STATE"], r["OBJECT_TCP_NEW_STATE"]))
    assert len(records) == 7, by_socket
    assert sorted(by_socket.values()) == sorted([helpers.LISTENER_SEQUENCE,
                                                 helpers.ACCEPTED_SEQUENCE])
    # Everything printed (to /dev/null) is in the journal, and nothing else.
    everything = read_journal(proc.pid)
    assert {r["OBJECT_TCP_SOURCE_PORT"] for r in everything} == {str(probe), str(port)}
    assert helpers.summary(err)["printed"] == len(everything)
    assert helpers.summary(err)["unsent"] == 0


@pytest.mark.live
def test_journald_not_running_is_one_line():
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none /run && exec "$0" "$1" -Y', sys.executable, TOOL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "tcpstates: -Y: journald is not running (nothing listens on "
        "/run/systemd/journal/socket); start systemd-journald, or run without -Y"]
    assert proc.stdout == ""


@pytest.mark.live
def test_journald_dying_mid_run_is_survived():
    port = helpers.free_port()
    rc, out, err = helpers.run_private_journal(helpers.JOURNALD_DIES, port)
    assert rc == 0, err
    report = json.loads(out)
    assert report["journal_before"] == 7
    assert report["rc"] == 0
    assert report["rows"] == 14
    err = report["stderr"].splitlines()
    assert len([l for l in err if "journal: sending a record failed" in l]) == 1
    assert helpers.summary(report["stderr"]) == {"printed": 14, "lost": 0, "skipped": 0,
                                                 "gaps": 0, "not_written": 0, "late": 0,
                                                 "unsent": 7}


@pytest.mark.live
def test_journald_falling_behind_is_counted_and_reported(loadgen):
    """journald stops taking records (SIGSTOP) while the tracer runs with a
    queue of 20: the records it could not queue are counted (summary, stderr
    line, PRIORITY 4 records), and with journald stuck a stop still ends
    within the grace, counting what was left."""
    rc, out, err = helpers.run_private_journal(helpers.JOURNALD_STALLS, loadgen)
    assert rc == 0, err
    report = json.loads(out)
    for name, r in report.items():
        assert r["rc"] == 0 and r["rows"] == r["expected"], (name, r)
        unsent = helpers.summary(r["stderr"])["unsent"]
        assert unsent > 0, (name, r)
        # every event: stored, or counted as not sent
        assert r["stored"] + unsent == r["expected"], (name, r)
        assert "journal records not sent" in r["stderr"] and "journald fell behind" in r["stderr"]
    r = report["overflow"]
    assert r["losses"] and all(loss["PRIORITY"] == "4" for loss in r["losses"]), r
    assert r["losses"][-1]["TCPSTATES_UNSENT_TOTAL"] == str(helpers.summary(r["stderr"])["unsent"])
    assert r["stored"] >= 20                      # the queue's, once journald came back
    # journald stuck at the stop: the 2 s grace bounds the wait for it
    assert report["stuck"]["stop_s"] < 4, report["stuck"]


def test_unit_lifts_journalds_rate_limit_as_systemd_passes_it_on():
    """What systemd tells journald of the unit's LogRateLimit* settings (the
    live test below gives journald exactly that). A unit's 0 is "not set":
    it would leave journald's defaults in force."""
    with open(os.path.join(ROOT, "systemd", "tcpstates.service")) as f:
        exports = helpers.unit_rate_limit_exports(f.read())
    interval = int(exports["/run/systemd/units/log-rate-limit-interval:tcpstates.service"])
    burst = int(exports["/run/systemd/units/log-rate-limit-burst:tcpstates.service"])
    assert burst / (interval / 1e6) >= 500_000          # records a second, per priority
    assert helpers.unit_rate_limit_exports("LogRateLimitIntervalSec=0\n") == {}
    assert helpers.unit_rate_limit_exports("LogRateLimitIntervalSec=500ms\n") == {
        "/run/systemd/units/log-rate-limit-interval:tcpstates.service": "500000"}


@pytest.mark.live
def test_journald_rate_limit_drops_records_and_the_unit_lifts_it(loadgen):
    """journald rate-limits a service by its cgroup: run as a unit without
    settings, most records are dropped (and tcpstates cannot know); with the
    unit's settings, none. Without systemd as PID 1: see journald_ratelimit.py."""
    root = helpers.cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    slice_dir = os.path.join(root, "system.slice")
    cgroup = os.path.join(slice_dir, "tcpstates.service")
    made = [d for d in (slice_dir, cgroup) if not os.path.exists(d)]
    for d in made:
        os.mkdir(d)
    # /etc/systemd private too, with a journald.conf of the test's: 50
    # records every 2 s (journald scales the burst up a little with free
    # space).
    conf = ("mount -t tmpfs tmpfs /etc/systemd || exit 9; "
            "printf '[Journal]\\nRateLimitIntervalSec=2s\\nRateLimitBurst=50\\n' "
            "> /etc/systemd/journald.conf || exit 9; ")
    try:
        rc, out, err = helpers.run_private_journal(helpers.JOURNALD_RATELIMIT, loadgen, cgroup,
                                                   setup=conf, timeout=180)
    finally:
        for d in reversed(made):
            helpers.wait_for(lambda: not open(os.path.join(d, "cgroup.procs")).read(), 5)
            os.rmdir(d)
    assert rc == 0, err
    report = json.loads(out)
    for phase in ("defaults", "unit"):
        r = report[phase]
        assert r["rc"] == 0 and r["rows"] == r["expected"], r
        assert r["units"] == ["tcpstates.service"], r          # attributed by cgroup
        # tcpstates handed every record to journald: it sees no loss
        assert helpers.summary(r["stderr"])["unsent"] == 0, r
    # As a unit without settings: journald dropped most records, and says
    # how many only in its own "Suppressed" line.
    r = report["defaults"]
    assert r["stored"] < r["expected"] / 2, r
    assert len(r["dropped"]) == 1, r
    suppressed = int(re.fullmatch(r"Suppressed (\d+) messages from tcpstates\.service",
                                  r["dropped"][0]).group(1))
    assert r["stored"] + suppressed == r["expected"], r
    # With the unit's settings, as systemd passes them on: every record.
    r = report["unit"]
    assert r["stored"] == r["expected"] and r["dropped"] == [], r


@pytest.mark.usefixtures("journald")
def test_records_forwarded_to_a_central_journal(tmp_path, installed):
    """-Y records -> local journald -> systemd-journal-upload -> HTTP ->
    systemd-journal-remote on loopback -> a journal file, with every field."""
    remote = "/lib/systemd/systemd-journal-remote"
    upload = "/lib/systemd/systemd-journal-upload"
    if not (os.access(remote, os.X_OK) and os.access(upload, os.X_OK)):
        pytest.skip("systemd-journal-remote is not installed (setup.sh installs it)")
    from systemd import journal
    journal.sendv("MESSAGE=tcpstates forwarding test starts", "SYSLOG_IDENTIFIER=tcpstates-test")
    time.sleep(0.2)
    cursor = subprocess.run(["journalctl", "-n", "1", "--show-cursor", "-q", "--no-pager"],
                            capture_output=True, text=True).stdout
    cursor = re.search(r"^-- cursor: (.+)$", cursor, re.M).group(1)
    with TracerRun("-Y", "-s") as tracer:
        sessions = [tcp_session(socket.AF_INET, hold=0.25), tcp_session(socket.AF_INET6, hold=0.25)]
        for s in sessions:
            tracer.wait_until(lambda ls: len(rows_for_port(parse_csv(ls), s.port)) >= 12, 10)
        time.sleep(0.2)
        assert tracer.stop() == 0
    wait_journal(tracer.proc.pid, 24)
    http_port = helpers.free_port()
    out = tmp_path / "remote.journal"
    receiver = subprocess.Popen([remote, "--split-mode=none", "--listen-http=127.0.0.1:%d" % http_port,
                                 "--output=%s" % out], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    try:
        sent = None
        for _ in range(50):                       # until the receiver listens
            sent = subprocess.run([upload, "--url=http://127.0.0.1:%d" % http_port,
                                   "--after-cursor=%s" % cursor, "--follow=no"],
                                  capture_output=True, stdin=subprocess.DEVNULL,
                                  text=True, timeout=60)
            if sent.returncode == 0 and "failed" not in sent.stderr:
                break
            time.sleep(0.1)
        assert sent.returncode == 0, sent.stderr
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(10)
    local = read_journal(tracer.proc.pid)
    forwarded = read_journal(tracer.proc.pid, file=str(out))
    assert len(forwarded) == len(local) >= 24
    for s in sessions:
        check_client_records(forwarded, s, os.getpid())
    ours = lambda r: {k: v for k, v in r.items() if not k.startswith("__")}
    assert [ours(r) for r in forwarded] == [ours(r) for r in local]

    # journalctl -x explains the forwarded records with the installed
    # catalog. journalctl 252 reads the catalog database only from the real
    # root, so the installed one is bind-mounted there in a private mount
    # namespace.
    explained = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mkdir -p /var/lib/systemd/catalog && mount --bind "$0" /var/lib/systemd/catalog && exec journalctl --file="$1" -x '
         '--no-pager -n 1 MESSAGE_ID=%s' % tcpstates.JOURNAL_MESSAGE_ID,
         str(installed / "var/lib/systemd/catalog"), str(out)],
        capture_output=True, text=True).stdout
    assert "Subject: TCP socket changed state: " in explained, explained
    assert "Documentation: man:tcpstates(8)" in explained


def test_reason_fields_and_message():
    from helpers import RESET_NAMES
    reasons = tcpstates.Reasons(RESET_NAMES)
    ev = make_event(oldstate=2, newstate=7, rflags=tcpstates.R_RST_RECEIVED | tcpstates.R_ERRNO
                    | tcpstates.R_RETRIES, error=111)
    clock = tcpstates.Clock()
    f = tcpstates.journal_fields(ev, clock, FakeProcs().owner(ev), reasons(ev))
    assert f["MESSAGE"].endswith(
        "SYN_SENT \u2192 CLOSE after 300.206 ms: connection refused, errno 111")
    assert (f["TCPSTATES_REASON"], f["ERRNO"], f["TCPSTATES_RETRIES"]) == ("refused", "111", "0")
    assert "TCPSTATES_RESET_REASON" not in f
    ev = make_event(oldstate=1, newstate=7, rflags=tcpstates.R_RST_SENT | tcpstates.R_RST_REASON,
                    rst_reason=14)
    f = tcpstates.journal_fields(ev, clock, None, reasons(ev))
    assert f["MESSAGE"].endswith("ESTABLISHED \u2192 CLOSE after 300.206 ms: reset sent (TCP_STATE)")
    assert (f["TCPSTATES_REASON"], f["TCPSTATES_RESET_REASON"]) == ("reset-sent", "TCP_STATE")
    assert "ERRNO" not in f and "TCPSTATES_RETRIES" not in f
    # unknown: the facts that are known, no word, nothing said in MESSAGE
    ev = make_event(oldstate=1, newstate=7, rflags=tcpstates.R_ERRNO, error=104)
    f = tcpstates.journal_fields(ev, clock, None, reasons(ev))
    assert "TCPSTATES_REASON" not in f and f["ERRNO"] == "104"
    assert f["MESSAGE"].endswith("CLOSE after 300.206 ms")


def test_journal_writer_sends_reasons():
    sent = []
    writer = tcpstates.JournalWriter(tcpstates.Clock(), FakeProcs(), sent.append)
    writer.events([tuple(make_event(oldstate=10, newstate=7))])
    assert b"\nTCPSTATES_REASON=listener-closed\n" in sent[0]
