"""Live tests: the real BPF program in the running kernel, real loopback
TCP connections on ports the tests chose, assertions on what the tool
printed. They need root; see conftest.py for how CI forbids skipping them."""
import csv
import ctypes
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import helpers
from helpers import (ACCEPTED_SEQUENCE, CLIENT_SEQUENCE, EVENTS_PER_SESSION,
                     LISTENER_SEQUENCE, TOOL, TracerRun, classify, parse_csv,
                     rows_for_port, table_rows, tcp_session, transitions)

pytestmark = pytest.mark.live


def run_session_and_collect(tracer, rows_of, family=socket.AF_INET, hold=0.0,
                            expect=EVENTS_PER_SESSION, **kw):
    session = tcp_session(family, hold=hold, **kw)
    ok = tracer.wait_until(
        lambda lines: len(rows_for_port(rows_of(lines), session.port)) >= expect, 10)
    rows = rows_for_port(rows_of(tracer.snapshot()), session.port)
    assert ok, "expected %d rows for port %d, got %d:\n%s" % (
        expect, session.port, len(rows), "\n".join(tracer.snapshot()[-30:]))
    return session, rows


def test_full_sequence_ipv4_table():
    with TracerRun() as tracer:
        assert tracer.header.split() == [
            "SKADDR", "C-PID", "C-COMM", "LADDR", "LPORT", "RADDR", "RPORT",
            "OLDSTATE", "->", "NEWSTATE", "MS"]
        session, rows = run_session_and_collect(tracer, table_rows, hold=0.3)
        assert tracer.stop() == 0
    client, accepted, listener = classify(rows, session)
    assert transitions(client) == CLIENT_SEQUENCE
    assert transitions(accepted) == ACCEPTED_SEQUENCE
    assert transitions(listener) == LISTENER_SEQUENCE
    # Addresses and ports, per socket.
    for r in listener:
        assert (r["LADDR"], r["LPORT"], r["RADDR"], r["RPORT"]) == (
            "127.0.0.1", str(session.port), "0.0.0.0", "0")
    # The client's source port is chosen during connect: 0 in its first row.
    assert client[0]["LPORT"] == "0"
    for r in client[1:]:
        assert (r["LADDR"], r["LPORT"], r["RADDR"], r["RPORT"]) == (
            "127.0.0.1", str(session.client_port), "127.0.0.1", str(session.port))
    for r in accepted:
        assert (r["LADDR"], r["LPORT"], r["RADDR"], r["RPORT"]) == (
            "127.0.0.1", str(session.port), "127.0.0.1", str(session.client_port))
    # Spans: unknown (0) on a socket's first row, ~300 ms in ESTABLISHED.
    assert float(client[0]["MS"]) == 0.0
    assert float(accepted[0]["MS"]) == 0.0
    assert float(listener[0]["MS"]) == 0.0
    est_client = float(client[2]["MS"])
    est_accepted = float(accepted[2]["MS"])
    assert 295 <= est_client <= 800, est_client
    assert 295 <= est_accepted <= 800, est_accepted
    assert float(listener[1]["MS"]) >= est_client
    for r in client[1:2] + client[3:]:
        assert 0 < float(r["MS"]) < 200, r
    # The connecting process is the on-CPU task of the connect.
    assert client[0]["C-PID"] == str(os.getpid())
    assert re.fullmatch(r"[0-9a-f]{8,16}", client[0]["SKADDR"])


def test_ipv6_wide():
    with TracerRun("-w") as tracer:
        assert tracer.header.split() == [
            "SKADDR", "C-PID", "C-COMM", "IP", "LADDR", "LPORT", "RADDR",
            "RPORT", "OLDSTATE", "->", "NEWSTATE", "MS"]
        session, rows = run_session_and_collect(tracer, table_rows, socket.AF_INET6)
        assert tracer.stop() == 0
    client, accepted, listener = classify(rows, session)
    assert transitions(client) == CLIENT_SEQUENCE
    assert transitions(accepted) == ACCEPTED_SEQUENCE
    assert transitions(listener) == LISTENER_SEQUENCE
    assert all(r["IP"] == "6" for r in rows)
    assert [(r["LADDR"], r["RADDR"]) for r in accepted] == [("::1", "::1")] * 5
    assert {(r["LADDR"], r["RADDR"]) for r in listener} == {("::1", "::")}
    # Wide columns stay aligned for IPv6: every row has the header's width
    # up to the MS column.
    lines = [l for l in tracer.snapshot() if str(session.port) in l]
    ms_col = tracer.header.index("MS")
    for line in lines:
        assert line[ms_col - 1] == " " and line[ms_col] != " ", line


def test_csv_parses_with_time_and_timestamp():
    with TracerRun("-s", "-T", "-t") as tracer:
        assert tracer.header == ("TIME,TIME(s),SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,"
                                 "RADDR,RPORT,OLDSTATE,NEWSTATE,MS")
        before = time.time()
        session, rows = run_session_and_collect(tracer, parse_csv, hold=0.2)
        after = time.time()
        assert tracer.stop() == 0
    all_rows = list(csv.reader(io.StringIO("\n".join(tracer.snapshot()))))
    assert all(len(r) == 13 for r in all_rows)
    # -T is the event's time of day.
    allowed = {time.strftime("%H:%M:%S", time.localtime(t))
               for t in range(int(before) - 1, int(after) + 2)}
    assert all(r["TIME"] in allowed for r in rows)
    # -t: seconds since the first traced event, never decreasing, and the
    # gap between two rows of one socket matches that socket's span.
    stamps = [float(r["TIME(s)"]) for r in parse_csv(tracer.snapshot())]
    assert stamps[0] == 0.0
    assert stamps == sorted(stamps)
    client, _, _ = classify(rows, session)
    gap_ms = (float(client[2]["TIME(s)"]) - float(client[1]["TIME(s)"])) * 1000
    assert abs(gap_ms - float(client[2]["MS"])) < 1.0
    assert 195 <= float(client[2]["MS"]) <= 700
    assert all(r["IP"] == "4" for r in rows)


def test_localport_filter():
    port = helpers.free_port()
    with TracerRun("-s", "-L", "%d,%d" % (port, helpers.free_port())) as tracer:
        other = tcp_session()
        session, rows = run_session_and_collect(tracer, parse_csv, port=port, expect=7)
        time.sleep(0.3)
        assert tracer.stop() == 0
    rows = parse_csv(tracer.snapshot())
    assert rows and all(r["LPORT"] == str(port) for r in rows)
    _, accepted, listener = classify(rows, session)
    assert transitions(accepted) == ACCEPTED_SEQUENCE
    assert transitions(listener) == LISTENER_SEQUENCE
    assert not rows_for_port(rows, other.port)
    # Spans stay right under a filter: the accepted socket's time in
    # ESTABLISHED was measured although the filter hid nothing there.
    assert float(accepted[1]["MS"]) > 0


def test_remoteport_filter():
    port = helpers.free_port()
    with TracerRun("-s", "-D", str(port)) as tracer:
        other = tcp_session()
        session, rows = run_session_and_collect(tracer, parse_csv, port=port, expect=5)
        time.sleep(0.3)
        assert tracer.stop() == 0
    rows = parse_csv(tracer.snapshot())
    assert rows and all(r["RPORT"] == str(port) for r in rows)
    client, accepted, listener = classify(rows, session)
    assert transitions(client) == CLIENT_SEQUENCE
    assert accepted is None and listener is None
    assert not rows_for_port(rows, other.port)


@pytest.mark.parametrize("flag, wanted, unwanted", [
    ("-4", socket.AF_INET, socket.AF_INET6),
    ("-6", socket.AF_INET6, socket.AF_INET),
])
def test_family_filter(flag, wanted, unwanted):
    with TracerRun("-s", flag) as tracer:
        hidden = tcp_session(unwanted)
        session, rows = run_session_and_collect(tracer, parse_csv, wanted)
        time.sleep(0.3)
        assert tracer.stop() == 0
    rows = parse_csv(tracer.snapshot())
    version = "4" if wanted == socket.AF_INET else "6"
    assert rows and all(r["IP"] == version for r in rows)
    assert not rows_for_port(rows, hidden.port)


def set_thread_name(name):
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NAME = 15
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


HOSTILE = b"\x1b[31mx,\"q\n\t\xff"   # 11 bytes: ESC, comma, quote, newline, tab, bad UTF-8


def hostile_connect(port_holder):
    """Connect from a thread whose kernel task name is hostile."""
    set_thread_name(HOSTILE)
    s = socket.create_connection(("127.0.0.1", port_holder[0]), timeout=5)
    s.close()


@pytest.mark.parametrize("mode", ["table", "csv"])
def test_hostile_process_name(mode):
    args = ["-s"] if mode == "csv" else ["-w"]
    srv = socket.socket()
    srv.bind(("127.0.0.1", helpers.free_port()))
    srv.listen(4)
    port = srv.getsockname()[1]
    with TracerRun(*args) as tracer:
        t = threading.Thread(target=hostile_connect, args=([port],))
        t.start()
        t.join(10)
        acc, _ = srv.accept()
        acc.close()
        srv.close()
        ok = tracer.wait_until(lambda ls: any("SYN_SENT" in l and str(port) in l for l in ls), 10)
        time.sleep(0.2)
        assert tracer.stop() == 0
        assert ok
    raw_lines = tracer.snapshot()
    text = "\n".join(raw_lines)
    assert "\x1b" not in text and "\t" not in text
    expected = "\\x1b[31mx,\"q\\x0a\\x09\\xff"
    if mode == "csv":
        rows = [r for r in parse_csv(raw_lines) if r["RPORT"] == str(port)
                and r["NEWSTATE"] == "SYN_SENT"]
        assert rows and rows[0]["C-COMM"] == expected
        assert all(len(r) == 11 for r in csv.reader(raw_lines))
    else:
        line = [l for l in raw_lines if "SYN_SENT" in l and str(port) in l][0]
        # The name is escaped, then cut to the column's 16 characters.
        assert expected[:16] in line


def test_sigterm_and_sigint_exit_zero():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        tracer = TracerRun()
        start = time.monotonic()
        rc = tracer.stop(sig)
        assert rc == 0, (sig, tracer.stderr)
        assert time.monotonic() - start < 2.0
        assert len(tracer.stderr.splitlines()) == 1
        assert helpers.summary(tracer.stderr)["lost"] == 0


def test_sigterm_keeps_rows_written_to_file(tmp_path):
    out = tmp_path / "out.csv"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, TOOL, "-s"], stdout=f,
                                stderr=subprocess.PIPE, preexec_fn=helpers.default_sigint)
        deadline = time.monotonic() + 30
        while out.stat().st_size == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        session = tcp_session()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    rows = parse_csv(out.read_text().splitlines())
    assert len(rows_for_port(rows, session.port)) == EVENTS_PER_SESSION


def test_pipe_to_head_ends_quietly():
    proc = subprocess.Popen(
        ["bash", "-o", "pipefail", "-c", '"$0" "$1" | head -n 3', sys.executable, TOOL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=helpers.default_sigint)
    # Keep making connections (bounded) until the pipeline ends.
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        tcp_session()
        time.sleep(0.05)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert len(out.decode().splitlines()) == 3
    assert err == b""


def test_non_root_gets_one_line():
    # The clone may sit where nobody (65534) cannot enter: run a copy of the
    # tool from a directory that user can read, so the tool's own check is
    # what answers, not "can't open file".
    with tempfile.TemporaryDirectory(prefix="tcpstates-nonroot-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)
        tool = os.path.join(tmp, "tcpstates.py")
        shutil.copyfile(TOOL, tool)
        os.chmod(tool, 0o644)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, tool], capture_output=True, timeout=30, cwd=tmp)
    assert proc.returncode == 1
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpstates: ")
    assert "root" in lines[0] and "sudo" in lines[0]
    assert proc.stdout == b""


def _in_private_mounts(shell):
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         shell + ' && exec "$0" "$1"', sys.executable, TOOL],
        capture_output=True, timeout=60)


def test_no_tracefs_gets_one_line():
    proc = _in_private_mounts(
        "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug 2>/dev/null;"
        " mount -t tmpfs none /sys/kernel/tracing && true")
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 1, lines
    assert len(lines) == 1 and "tracefs is not mounted" in lines[0]
    assert "mount -t tracefs" in lines[0]


def test_no_kernel_headers_gets_one_line():
    proc = _in_private_mounts("mount -t tmpfs none /lib/modules")
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 1, lines
    assert len(lines) == 1 and "no kernel headers" in lines[0]
    assert "linux-headers-" in lines[0]


def test_bpf_compile_failure_is_one_line(monkeypatch, capsys):
    import tcpstates
    monkeypatch.setattr(tcpstates, "BPF_PROGRAM",
                        tcpstates.BPF_PROGRAM.replace("events.perf_submit", "no_such_map.perf_submit"))
    assert tcpstates.main([]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tcpstates: compiling the BPF program failed")
    assert "no_such_map" in err[0]


def test_main_in_process_sees_a_connection(capsys):
    """main() called in-process, stopped by a SIGTERM it receives."""
    import tcpstates
    sessions = []

    def workload():
        time.sleep(1.5)       # compile and attach happen meanwhile
        sessions.append(tcp_session(socket.AF_INET6))
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    t = threading.Thread(target=workload)
    t.start()
    try:
        rc = tcpstates.main(["-s", "-6"])
    finally:
        t.join()
        for s, h in saved.items():
            signal.signal(s, h)
    assert rc == 0
    rows = parse_csv(capsys.readouterr().out.splitlines())
    client, accepted, listener = classify(rows, sessions[0])
    assert transitions(client) == CLIENT_SEQUENCE
    assert transitions(accepted) == ACCEPTED_SEQUENCE


def test_readme_run_command_traces():
    """README's command 1 (`bash setup.sh run`) starts the tracer, which
    prints the header and rows for traffic made here."""
    proc = subprocess.Popen(["bash", os.path.join(helpers.ROOT, "setup.sh"), "run", "-s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=helpers.default_sigint)
    try:
        header = proc.stdout.readline().decode()
        assert header.startswith("SKADDR,C-PID,C-COMM"), proc.stderr.read()
        session = tcp_session()
        lines = [header]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines.append(proc.stdout.readline().decode())
            if len(rows_for_port(parse_csv(lines), session.port)) >= EVENTS_PER_SESSION:
                break
        assert len(rows_for_port(parse_csv(lines), session.port)) == EVENTS_PER_SESSION
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_fallback_reader_prints_the_same_rows():
    """BCC's own perf reader (used where the mmap reader does not run, i.e.
    off x86_64) is run here too, so that it cannot rot unseen."""
    port = helpers.free_port()
    with TracerRun("-s", "-L", str(port), "--bcc-reader") as tracer:
        session = tcp_session(port=port)
        assert tracer.wait_until(lambda ls: len(parse_csv(ls)) >= 7, 10)
        assert tracer.stop() == 0
    _client, accepted, listener = helpers.classify(parse_csv(tracer.snapshot()), session)
    assert transitions(accepted) == ACCEPTED_SEQUENCE
    assert transitions(listener) == LISTENER_SEQUENCE
    assert helpers.summary(tracer.stderr)["printed"] == 7
