"""Output that other programs can trust: JSON lines, event-time order,
transition filters in the kernel, bounded runs."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import helpers
import tcpstates
from helpers import (ACCEPTED_SEQUENCE, CLIENT_SEQUENCE, EVENTS_PER_SESSION,
                     LISTENER_SEQUENCE, TracerRun, args_for, formatter,
                     json_record, make_event, parse_csv, rows_for_port, tcp_session,
                     v6_event)


# -- unit: JSON ----------------------------------------------------------------
def test_json_record_ipv4():
    clock = tcpstates.Clock()
    clock.wall_minus_mono = 1_764_180_000 * 10 ** 9 - 5 * 10 ** 9
    f = formatter("-j", clock=clock)
    assert f.header() == ""
    rec = json.loads(f.row(make_event(ts_ns=5_000_123_456)))
    assert rec == {
        "time": "2025-11-26T18:00:00.000123Z", "elapsed": 0.0,
        "skaddr": "ffff888102ed1280", "ip": 4,
        "laddr": "127.0.0.1", "lport": 41365, "raddr": "10.1.2.3", "rport": 46400,
        "oldstate": "ESTABLISHED", "newstate": "FIN_WAIT1", "span_us": 300206,
        "pid": 4242, "comm": "curl",
        "owner_pid": 4242, "owner_comm": "curl", "owner_from": "self",
        "owner_cgroup": "/system.slice/curl.service",
        "reason": None, "errno": None, "retries": None, "reset_reason": None,
    }
    assert json.loads(f.row(make_event(ts_ns=5_000_123_456))) == json_record(
        f, make_event(ts_ns=5_000_123_456))
    later = json.loads(f.row(make_event(ts_ns=6_500_123_456)))
    assert later["elapsed"] == 1.5 and later["time"] == "2025-11-26T18:00:01.500123Z"
    assert '"elapsed":0.000001,' in f.row(make_event(ts_ns=5_000_124_456))


def test_json_record_ipv6_unknowns_are_null():
    f = formatter("-j")
    rec = json.loads(f.row(v6_event(flags=0, opid=0, span_us=0)))
    assert rec["ip"] == 6 and rec["laddr"] == "2001:db8::1"
    assert rec["raddr"] == "fe80::abcd:ef01:2345:6789"
    assert rec["span_us"] is None
    assert rec["owner_pid"] is None and rec["owner_comm"] is None and rec["owner_cgroup"] is None
    assert rec["owner_from"] is None


@pytest.mark.parametrize("name", [b"\x1b[2J", b'q"uo\\te', b"nl\nx", b"\xff\xfe", b"\xe2\x80\xae"])
def test_json_hostile_names(name):
    f = formatter("-j")
    line = f.row(make_event(comm=name.ljust(16, b"\0")))
    assert line.count("\n") == 1 and line.endswith("\n")
    assert all(0x20 <= ord(c) < 0x7f for c in line[:-1]), line
    assert json.loads(line)["comm"] == tcpstates.comm_text(name.ljust(16, b"\0"))


def test_json_and_csv_exclude_each_other():
    with pytest.raises(tcpstates.UsageError):
        args_for("-j", "-s")


# -- unit: state and span filters ----------------------------------------------
@pytest.mark.parametrize("text, numbers", [
    ("SYN_SENT", (2,)), ("syn-sent", (2,)), ("estab,close", (1, 7)),
    ("FIN-WAIT-1", (4,)), ("Fin_Wait2", (5,)), ("unconn", (7,)), ("bound_inactive", (13,)),
])
def test_state_names_as_ss_and_the_tool_print_them(text, numbers):
    assert tcpstates.state_list(text) == numbers


def test_unknown_state_lists_the_valid_ones():
    import argparse
    with pytest.raises(argparse.ArgumentTypeError) as err:
        tcpstates.state_list("SYN_SENT,WAITING")
    assert "'WAITING'" in str(err.value) and "ESTABLISHED, SYN_SENT" in str(err.value)


def test_filter_cflags():
    cflags = tcpstates.bpf_cflags(args_for("--from", "SYN_SENT", "--to", "close,estab",
                                           "--min-span", "2.5"))
    assert cflags == ["-DFILTER_OLDSTATES=0x4U", "-DFILTER_NEWSTATES=0x82U",
                      "-DFILTER_MIN_SPAN_US=2500ULL"]


@pytest.mark.parametrize("argv", [["--min-span", "0"], ["--min-span", "-1"], ["--min-span", "x"],
                                  ["--duration", "0"], ["--count", "1.5"], ["--count", "0"],
                                  ["--from", ""], ["--to", "SYN"]])
def test_bad_filter_and_limit_values(argv):
    with pytest.raises(tcpstates.UsageError):
        args_for(*argv)


# -- unit: ordering ------------------------------------------------------------
def ev_at(ts, cpu=0):
    return make_event(ts_ns=ts, pid=cpu)


def test_reorderer_sorts_interleaved_cpus_and_loses_nothing():
    import random
    rnd = random.Random(7)
    r = tcpstates.Reorderer()
    # Four CPUs, each in order, read one after the other in batches.
    streams = [sorted(rnd.sample(range(1, 100_000), 500)) for _ in range(4)]
    out = []
    horizon = 0
    cursors = [0] * 4
    while any(c < 500 for c in cursors):
        horizon += 5_000
        for cpu in range(4):
            stream = streams[cpu]
            while cursors[cpu] < 500 and stream[cursors[cpu]] <= horizon + rnd.randint(0, 3000):
                r.pending.append(ev_at(stream[cursors[cpu]], cpu))
                cursors[cpu] += 1
        ready = r.release(horizon)
        # nothing held past the horizon: all that is left is newer
        assert all(ev.ts_ns > horizon for ev in r.pending)
        out.extend(ready)
    out.extend(r.release(None))
    stamps = [ev.ts_ns for ev in out]
    assert stamps == sorted(stamps)
    assert sorted(stamps) == sorted(ts for s in streams for ts in s)
    assert r.late == 0


def test_reorderer_counts_what_comes_after_later_events():
    """An event that reaches its buffer later than the margin is given out
    at once, out of order, and counted."""
    r = tcpstates.Reorderer()
    r.pending.extend([ev_at(10), ev_at(20)])
    assert [e.ts_ns for e in r.release(25)] == [10, 20]
    r.pending.extend([ev_at(15), ev_at(18), ev_at(30)])
    assert [e.ts_ns for e in r.release(35)] == [15, 18, 30]
    assert r.late == 2


def test_reorderer_holds_only_what_is_past_the_horizon():
    r = tcpstates.Reorderer()
    for ts in (30, 10, 20, 50, 40):
        r.pending.append(ev_at(ts))
    assert [e.ts_ns for e in r.release(25)] == [10, 20]
    assert len(r.pending) == 3
    assert r.release(25) == []
    assert [e.ts_ns for e in r.release(None)] == [30, 40, 50]
    assert len(r.pending) == 0


# -- live ------------------------------------------------------------------
def json_rows(lines):
    return [json.loads(l) for l in lines if l.startswith("{")]


def json_for_port(rows, port):
    return [r for r in rows if port in (r["lport"], r["rport"])]


@pytest.mark.live
def test_json_lines_describe_the_connections():
    with TracerRun("-j") as tracer:
        sessions = [tcp_session(socket.AF_INET, hold=0.1), tcp_session(socket.AF_INET6)]
        ok = tracer.wait_until(lambda ls: all(
            len(json_for_port(json_rows(ls), s.port)) >= EVENTS_PER_SESSION for s in sessions), 10)
        assert tracer.stop() == 0 and ok
    rows = json_rows(tracer.snapshot())
    for session, ip, local in ((sessions[0], 4, "127.0.0.1"), (sessions[1], 6, "::1")):
        mine = json_for_port(rows, session.port)
        assert len(mine) == EVENTS_PER_SESSION
        by_sock = {}
        for r in mine:
            by_sock.setdefault(r["skaddr"], []).append((r["oldstate"], r["newstate"]))
        assert sorted(by_sock.values()) == sorted([CLIENT_SEQUENCE, ACCEPTED_SEQUENCE,
                                                   LISTENER_SEQUENCE])
        for r in mine:
            assert r["ip"] == ip and r["laddr"] == local
            assert isinstance(r["lport"], int) and isinstance(r["pid"], int)
            assert r["owner_pid"] == os.getpid() and r["owner_comm"] == "python3"
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r["time"])
        firsts = [r for r in mine if r["oldstate"] in ("CLOSE", "LISTEN") and r["newstate"] != "CLOSE"]
        assert all(r["span_us"] is None for r in firsts)
        est = [r for r in mine if r["oldstate"] == "ESTABLISHED"]
        if session is sessions[0]:
            assert all(95_000 <= r["span_us"] <= 600_000 for r in est)
    # time and elapsed agree with each other and with the wall clock
    import datetime
    t0 = datetime.datetime.strptime(rows[0]["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    t1 = datetime.datetime.strptime(rows[-1]["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs((t1 - t0).total_seconds() - (rows[-1]["elapsed"] - rows[0]["elapsed"])) < 0.001
    now = datetime.datetime.utcnow()
    assert abs((now - t1).total_seconds()) < 30


SERVER_LOOP = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(128)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = srv.accept()
    while c.recv(8):      # until the client's FIN: the client closes first
        pass
    c.close()
srv.close()
"""
CLIENT_LOOP = r"""
import socket, sys
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); s.sendall(b"x")
    s.close()
"""


@pytest.mark.live
@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two CPUs")
def test_causal_order_across_cpus():
    """Client pinned to CPU 0, server to CPU 1: each socket's events come
    from both CPUs' buffers, and must still leave in causal order."""
    port, n = helpers.free_port(), 300
    with TracerRun("-s", "-t", "-L", str(port)) as t_local, \
            TracerRun("-s", "-t", "-D", str(port)) as t_remote:
        server = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", SERVER_LOOP,
                                   str(port), str(n)], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", CLIENT_LOOP,
                                 str(port), str(n)], timeout=60)
        assert client.returncode == 0 and server.wait(30) == 0
        for t, want in ((t_local, 5 * n + 2), (t_remote, 5 * n)):
            assert t.wait_until(lambda ls: len(ls) - 1 >= want, 15), len(t.snapshot())
            assert t.stop() == 0
    server_rows = parse_csv(t_local.snapshot())
    client_rows = parse_csv(t_remote.snapshot())
    for t, rows, seq_accepted in ((t_local, server_rows, ACCEPTED_SEQUENCE),
                                  (t_remote, client_rows, CLIENT_SEQUENCE)):
        # In order, but for events read later than the reorder margin (the
        # tracer not scheduled for that long, on a busy machine): those go
        # out as they come, and are counted in the summary as "late".
        late = helpers.summary(t.stderr)["late"]
        stamps = [float(r["TIME(s)"]) for r in rows]
        backwards = sum(1 for a, b in zip(stamps, stamps[1:]) if b < a)
        assert backwards <= late, ("TIME(s) went backwards, uncounted", backwards, late)
        socks = {}
        for r in rows:
            if r["RPORT"] == "0":
                continue
            # SKADDRs are reused: a socket's life ends at CLOSE. (By the
            # kernel's time: a late row is out of place only in the output.)
            socks.setdefault(r["SKADDR"], []).append(
                (float(r["TIME(s)"]), r["OLDSTATE"], r["NEWSTATE"]))
        for skaddr, events in socks.items():
            seq = [e[1:] for e in sorted(events, key=lambda e: e[0])]
            lives = [seq[i:i + 5] for i in range(0, len(seq), 5)]
            assert all(life == seq_accepted for life in lives), (skaddr, seq[:10])
    # the two CPUs really were both involved
    assert len({r["C-PID"] for r in server_rows}) >= 2


@pytest.mark.live
def test_failed_connect_filter():
    closed = helpers.free_port()
    with TracerRun("-s", "--from", "syn-sent", "--to", "CLOSE") as tracer:
        ok_session = tcp_session()
        with socket.socket() as s:
            with pytest.raises(OSError):
                s.connect(("127.0.0.1", closed))
        ok = tracer.wait_until(lambda ls: any(",%d," % closed in l for l in ls), 10)
        time.sleep(0.3)
        assert tracer.stop() == 0 and ok
    rows = parse_csv(tracer.snapshot())
    assert all((r["OLDSTATE"], r["NEWSTATE"]) == ("SYN_SENT", "CLOSE") for r in rows)
    assert [r["RPORT"] for r in rows_for_port(rows, closed)] == [str(closed)]
    assert rows_for_port(rows, ok_session.port) == []


@pytest.mark.live
def test_min_span_filter():
    with TracerRun("-s", "--min-span", "200") as tracer:
        session = tcp_session(hold=0.3)
        ok = tracer.wait_until(lambda ls: len(rows_for_port(parse_csv(ls), session.port)) >= 3, 10)
        time.sleep(0.3)
        assert tracer.stop() == 0 and ok
    rows = rows_for_port(parse_csv(tracer.snapshot()), session.port)
    assert sorted((r["OLDSTATE"], r["NEWSTATE"]) for r in rows) == [
        ("ESTABLISHED", "CLOSE_WAIT"), ("ESTABLISHED", "FIN_WAIT1"), ("LISTEN", "CLOSE")]
    assert all(float(r["MS"]) >= 200 for r in parse_csv(tracer.snapshot()))


@pytest.mark.live
def test_duration_ends_the_run_on_time():
    tracer = TracerRun("-s", "--duration", "1.5")
    ready = time.monotonic()
    session = tcp_session()
    assert tracer.proc.wait(10) == 0
    end = time.monotonic()
    assert 1.3 <= end - ready <= 2.5, end - ready
    tracer._reader.join(5)
    rows = rows_for_port(parse_csv(tracer.snapshot()), session.port)
    assert len(rows) == EVENTS_PER_SESSION
    err = tracer.proc.stderr.read().decode()
    assert len(err.splitlines()) == 1 and helpers.summary(err)["lost"] == 0


@pytest.mark.live
def test_count_ends_the_run_after_n_events():
    port = helpers.free_port()
    tracer = TracerRun("-s", "--count", "5", "-L", str(port))
    tcp_session(port=port)
    assert tracer.proc.wait(10) == 0
    tracer._reader.join(5)
    lines = tracer.snapshot()
    assert len(lines) == 1 + 5
    assert helpers.summary(tracer.proc.stderr.read().decode()) == {
        "printed": 5, "lost": 0, "skipped": 0, "gaps": 0, "not_written": 0, "late": 0}
