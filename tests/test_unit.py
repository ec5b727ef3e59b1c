"""Unit tests: parsing, decoding, formatting. No root, no BCC needed."""
import argparse
import csv
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest

import tcpstates
from helpers import (TOOL, FakeProcs, args_for, formatter, json_record, make_event,
                     reference_row, v6_event)


# -- ports -------------------------------------------------------------------
@pytest.mark.parametrize("text, ports", [
    ("80", (80,)), ("443,80", (80, 443)), ("1,65535", (1, 65535)),
    ("80, 81", (80, 81)), ("22,22", (22,)),
])
def test_port_list_accepts(text, ports):
    assert tcpstates.port_list(text) == ports


@pytest.mark.parametrize("text", ["abc", "0", "70000", "65536", "80,", ",80",
                                  "", "-1", "8O", "1e3", "٣", "80;81"])
def test_port_list_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        tcpstates.port_list(text)


def test_port_bitmap_matches_the_c_lookup():
    words = tcpstates.port_bitmap((1, 63, 64, 80, 65535))
    def selected(port):
        return bool(words[port >> 6] & (1 << (port & 63)))
    assert [p for p in range(65536) if selected(p)] == [1, 63, 64, 80, 65535]
    assert all(0 <= w < 2 ** 64 for w in words) and len(words) == 1024


# -- states ------------------------------------------------------------------
def test_state_names_cover_every_kernel_state():
    names = [tcpstates.state_name(n) for n in range(1, 14)]
    assert names == ["ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1",
                     "FIN_WAIT2", "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK",
                     "LISTEN", "CLOSING", "NEW_SYN_RECV", "BOUND_INACTIVE"]
    assert tcpstates.state_name(0) == "0"
    assert tcpstates.state_name(99) == "99"


# -- decoding ----------------------------------------------------------------
def test_event_struct_matches_the_c_layout():
    # u64 x3, u32 x2, u16 x6, u8[16] x2, char[16] x2, u32 pad, u64, u16 x4
    assert tcpstates.EVENT_STRUCT.size == 128
    c_fields = re.search(r"struct event \{(.*?)\};", tcpstates.BPF_PROGRAM, re.S).group(1)
    names = re.findall(r"^\s*\w+ (\w+)(?:\[\d+\])?;", c_fields, re.M)
    assert [n for n in names if n != "pad"] == list(tcpstates.Event._fields)
    raw = struct.pack("<QQQIIHHHHHH16s16s16s16sIQHHHH", 1, 2, 3, 4, 11, 5, 6, 10, 7, 2, 1,
                      b"a" * 16, b"b" * 16, b"comm", b"owner", 0, 99, 12, 13, 14, 15)
    ev = tcpstates.Event._make(tcpstates.EVENT_STRUCT.unpack_from(raw))
    assert (ev.ts_ns, ev.skaddr, ev.span_us, ev.pid, ev.opid, ev.lport, ev.rport) == (
        1, 2, 3, 4, 11, 5, 6)
    assert (ev.family, ev.oldstate, ev.newstate, ev.flags) == (10, 7, 2, 1)
    assert ev.comm.rstrip(b"\0") == b"comm" and ev.ocomm.rstrip(b"\0") == b"owner"
    assert ev.osince == 99
    assert (ev.rflags, ev.rst_reason, ev.error, ev.retries) == (12, 13, 14, 15)
    # the readers find amendments by the low byte of flags at this offset
    sample = bytes(12) + raw
    assert sample[tcpstates.FLAGS_IN_SAMPLE] == 1


# -- formatting --------------------------------------------------------------
def test_default_row_matches_the_upstream_layout():
    f = formatter()
    assert f.header() == ("SKADDR           C-PID C-COMM     LADDR           LPORT "
                          "RADDR           RPORT OLDSTATE    -> NEWSTATE    MS\n")
    assert f.row(make_event()) == (
        "ffff888102ed1280 4242  curl       127.0.0.1       41365 10.1.2.3        "
        "46400 ESTABLISHED -> FIN_WAIT1   300.206\n")


@pytest.mark.parametrize("argv", [[], ["-w"], ["-T"], ["-t"], ["-T", "-t", "-w"]])
def test_columns_line_up_with_the_header(argv):
    f = formatter(*argv)
    header = f.header().rstrip("\n")
    starts = [i for i in range(len(header)) if header[i] != " " and (i == 0 or header[i - 1] == " ")]
    events = [make_event(), make_event(oldstate=10, newstate=3, span_us=0, pid=1,
                                       comm=b"swapper/1".ljust(16, b"\0"))]
    if "-w" in argv:
        events.append(v6_event())
    for ev in events:
        row = f.row(ev).rstrip("\n")
        row_starts = [i for i in range(len(row)) if row[i] != " " and (i == 0 or row[i - 1] == " ")]
        assert row_starts == starts, (header, row)


def test_wide_ipv6_row():
    f = formatter("-w")
    fields = f.row(v6_event()).split()
    assert fields[3:8] == ["6", "2001:db8::1", "41365", "fe80::abcd:ef01:2345:6789", "46400"]


def test_time_and_timestamp_come_from_the_event():
    clock = tcpstates.Clock()
    clock.wall_minus_mono = 1_700_000_000 * 10 ** 9 - 5 * 10 ** 9
    f = formatter("-T", "-t", clock=clock)
    first = f.row(make_event(ts_ns=5_000_000_000)).split()
    later = f.row(make_event(ts_ns=6_250_000_000)).split()
    import time
    assert first[0] == time.strftime("%H:%M:%S", time.localtime(1_700_000_000))
    assert later[0] == time.strftime("%H:%M:%S", time.localtime(1_700_000_001))
    assert (first[1], later[1]) == ("0.000000", "1.250000")


def test_csv_header_and_row():
    f = formatter("-s", "-T", "-t")
    assert f.header() == ("TIME,TIME(s),SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,"
                          "RPORT,OLDSTATE,NEWSTATE,MS\n")
    row = next(csv.reader([f.row(make_event())]))
    assert row[2:] == ["ffff888102ed1280", "4242", "curl", "4", "127.0.0.1", "41365",
                       "10.1.2.3", "46400", "ESTABLISHED", "FIN_WAIT1", "300.206"]


HOSTILE_NAMES = [b"\x1b[2J\x1b[H", b"a,b", b'say "hi"', b"line\nbreak", b"tab\there",
                 b"\xff\xfe\xc3", b"back\\slash", b"\xe2\x80\xaeevil", b"=cmd|' /C calc'!A0",
                 b"\x7f\x9b", b"caf\xc3\xa9", b"x" * 16]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_in_table_stay_on_one_safe_line(name):
    f = formatter("-w")
    line = f.row(make_event(comm=name[:16].ljust(16, b"\0")))
    assert line.endswith("\n") and line.count("\n") == 1
    assert all(ch.isprintable() for ch in line[:-1]), repr(line)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_round_trip_through_csv(name):
    f = formatter("-s")
    text = f.header() + f.row(make_event(comm=name[:16].ljust(16, b"\0")))
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == 2 and len(rows[1]) == 11
    expected = tcpstates.comm_text(name[:16].ljust(16, b"\0"))
    if expected[:1] in "=+-@":
        expected = "'" + expected
    assert rows[1][2] == expected
    assert "\n" not in rows[1][2] and "\x1b" not in rows[1][2]


def test_escaping_is_unambiguous():
    esc = lambda b: tcpstates.comm_text(b.ljust(16, b"\0"))
    assert esc(b"\x1b") == "\\x1b"
    assert esc(b"\\x1b") == "\\\\x1b"
    assert esc(b"\xff") == "\\xff"
    assert esc(b"caf\xc3\xa9") == "caf\u00e9"
    assert esc(b"\xe2\x80\xae") == "\\u202e"


def test_comm_cache_is_bounded():
    for i in range(10000):
        tcpstates.comm_text(b"p%d" % i)
    assert len(tcpstates.COMM_TEXTS) <= 4096


# -- BPF configuration -------------------------------------------------------
def test_cflags_follow_the_options():
    assert tcpstates.bpf_cflags(args_for()) == []
    assert tcpstates.bpf_cflags(args_for("-4")) == ["-DFILTER_FAMILY=2"]
    assert tcpstates.bpf_cflags(args_for("-6", "-L", "80", "-D", "5432")) == [
        "-DFILTER_FAMILY=10", "-DFILTER_LPORT=1", "-DFILTER_RPORT=1"]


def test_user_text_never_becomes_c():
    listing = tcpstates.ebpf_listing(args_for("-L", "443,80", "-D", "5432"))
    assert listing.endswith(tcpstates.BPF_PROGRAM)
    assert "443" not in tcpstates.BPF_PROGRAM and "5432" not in tcpstates.BPF_PROGRAM


def run_tool(*argv):
    return subprocess.run([sys.executable, TOOL] + list(argv), capture_output=True,
                          timeout=60)


def test_ebpf_prints_program_and_cflags():
    proc = run_tool("--ebpf", "-4", "-L", "80,443")
    assert proc.returncode == 0 and proc.stderr == b""
    out = proc.stdout.decode()
    assert re.match(r"// cflags: -DFILTER_FAMILY=2 -DFILTER_LPORT=1"
                    r"( -DHAVE_TCP_DESTROY_SOCK=1)?\n", out)
    assert "// local_ports map: 80,443\n" in out
    assert "int on_set_state(struct tracepoint__sock__inet_sock_set_state *args)" in out


@pytest.mark.parametrize("argv, words", [
    (["-L", "abc"], "invalid port 'abc'"),
    (["-L", "0"], "invalid port 0"),
    (["-L", "70000"], "invalid port 70000"),
    (["-L", "80,"], "empty item"),
    (["-D", ""], "empty item"),
    (["-4", "-6"], "not allowed with"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["-L"], "expected one argument"),
    (["extra"], "unrecognized arguments: extra"),
    (["--perf-pages", "3"], "power of two"),
])
def test_bad_arguments_exit_2_with_one_line(argv, words):
    proc = run_tool(*argv)
    assert proc.returncode == 2
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tcpstates: ") and words in lines[0]
    assert proc.stdout == b""


def test_bad_arguments_in_process(capsys):
    assert tcpstates.main(["-L", "abc"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_help_ends_with_examples():
    proc = run_tool("--help")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    tail = out[out.index("examples:"):]
    assert tail.strip().splitlines()[0] == "examples:"
    assert "--ebpf" not in out and "--perf-pages" not in out


def test_import_needs_no_bcc():
    proc = subprocess.run([sys.executable, "-S", "-c",
                           "import sys; sys.path.insert(0, %r); import tcpstates; "
                           "assert 'bcc' not in sys.modules" % str(tcpstates.__file__.rsplit('/', 1)[0])],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_missing_tracefs_message(monkeypatch, tmp_path):
    monkeypatch.setattr(tcpstates, "TRACEFS_CANDIDATES", (str(tmp_path),))
    with pytest.raises(tcpstates.Fatal, match="tracefs is not mounted"):
        tcpstates.check_tracepoint()
    (tmp_path / "events").mkdir()
    with pytest.raises(tcpstates.Fatal, match="needs Linux 4.16"):
        tcpstates.check_tracepoint()


def test_missing_privileges_message(monkeypatch):
    monkeypatch.setattr(tcpstates, "effective_caps", lambda: 0)
    with pytest.raises(tcpstates.Fatal, match="CAP_BPF and CAP_PERFMON"):
        tcpstates.check_privileges()


# -- owner -------------------------------------------------------------------
def test_extended_columns_follow_ms():
    f = formatter("-x", procs=FakeProcs(name="nginx", cgroup="/system.slice/nginx.service"))
    assert f.header().split()[-6:] == ["MS", "REASON", "O-PID", "O-COMM", "O-FROM", "CGROUP"]
    fields = f.row(make_event(opid=777, ocomm=b"nginx-worker".ljust(16, b"\0"))).split()
    assert fields[-6:] == ["300.206", "-", "777", "nginx", "self",
                           "/system.slice/nginx.service"]
    fields = f.row(make_event(oldstate=2, newstate=7, rflags=tcpstates.R_RST_RECEIVED)).split()
    assert fields[-5] == "refused"


def test_reason_column_alone_with_the_reason_filter():
    f = formatter("--reason", "timeout")
    assert f.header().split()[-2:] == ["MS", "REASON"]
    ev = make_event(oldstate=2, newstate=7, rflags=tcpstates.R_ERRNO | tcpstates.R_RETRIES,
                    error=110, retries=2)
    assert f.row(ev).split()[-2:] == ["300.206", "timeout:2-retries"]
    # the REASON column lines up with its title
    assert f.header().index("REASON") == f.row(ev).index("timeout")


def test_unknown_owner_prints_a_dash():
    f = formatter("-s", "-x")
    row = next(csv.reader([f.row(make_event(opid=0, flags=tcpstates.SPAN_KNOWN,
                                            ocomm=b"\0" * 16))]))
    assert row[-4:] == ["-", "-", "-", "-"]


def test_extended_csv_header():
    f = formatter("-s", "-x")
    assert f.header().rstrip("\n").split(",")[-6:] == ["MS", "REASON", "O-PID", "O-COMM",
                                                        "O-FROM", "CGROUP"]


INHERITED = tcpstates.SPAN_KNOWN | tcpstates.OWNER_KNOWN | tcpstates.OWNER_INHERITED


@pytest.mark.parametrize("table, expected", [
    # the process that listened still runs: shown, as inherited
    ({777: (1_000, "srv", "/cg")}, ["777", "srv", "listener", "/cg"]),
    # it has exited: unknown, not the dead process
    ({}, ["-", "-", "-", "-"]),
    # its PID now belongs to a process started after it listened: unknown
    ({777: (4_000_000_001, "stranger", "/other")}, ["-", "-", "-", "-"]),
])
def test_inherited_owner_only_while_the_same_process_runs(table, expected):
    f = formatter("-s", "-x", procs=FakeProcs(table))
    ev = make_event(opid=777, flags=INHERITED, osince=4_000_000_000)
    assert next(csv.reader([f.row(ev)]))[-4:] == expected


@pytest.mark.parametrize("table, expected", [
    ({777: (1_000, "srv", "/cg")}, ["777", "srv", "self", "/cg"]),
    # an owner that made the call stays the owner after it exits; the name
    # is then the kernel's, the cgroup unknown
    ({}, ["777", "srv-thread", "self", ""]),
    ({777: (4_000_000_001, "stranger", "/other")}, ["777", "srv-thread", "self", ""]),
])
def test_own_owner_outlives_its_process(table, expected):
    f = formatter("-s", "-x", procs=FakeProcs(table))
    ev = make_event(opid=777, ocomm=b"srv-thread".ljust(16, b"\0"), osince=4_000_000_000)
    assert next(csv.reader([f.row(ev)]))[-4:] == expected


@pytest.mark.parametrize("text, path", [
    ("0::/system.slice/ssh.service\n", "/system.slice/ssh.service"),
    ("12:pids:/\n1:name=systemd:/user.slice/session-1.scope\n0::/\n", "/user.slice/session-1.scope"),
    ("4:memory:/docker/abc\n1:cpu:/\n0::/\n", "/docker/abc"),
    ("0::/\n", "/"),
    ("", ""),
])
def test_cgroup_path(text, path):
    assert tcpstates.cgroup_path(text.splitlines()) == path


def test_process_cache_reads_stat_and_cgroup(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_bytes(b"0::/evil\x1b[2J\n")
    # the name holds a space and a parenthesis; starttime is field 22
    (tmp_path / "42" / "stat").write_bytes(
        b"42 (we ird) x) S" + b" 0" * 18 + b" 250 0 0\n")
    cache = tcpstates.ProcessCache(proc=str(tmp_path))
    cache.boot_minus_mono = 0
    start, name, cgroup = cache.get(42)
    assert start == 250 * cache.tick_ns
    assert name == "we ird) x" and cgroup == "/evil\\x1b[2J"
    assert cache.get(43) == cache.GONE          # no such process: no error
    (tmp_path / "42" / "cgroup").write_bytes(b"0::/moved\n")
    assert cache.get(42)[2] == "/evil\\x1b[2J"    # kept for a second
    # an exited process not yet reaped (a zombie) has exited
    (tmp_path / "44").mkdir()
    (tmp_path / "44" / "cgroup").write_bytes(b"0::/\n")
    (tmp_path / "44" / "stat").write_bytes(b"44 (z) Z" + b" 0" * 18 + b" 250 0 0\n")
    assert cache.get(44) == cache.GONE


def test_process_cache_sees_an_exit_at_the_next_batch():
    """The kernel is asked at every batch, through a pidfd: an owner that
    exits is gone at once, not after the cache's second."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    cache = tcpstates.ProcessCache()
    assert cache.get(child.pid)[0] is not None
    child.stdin.close()
    deadline = time.monotonic() + 10
    while not os.path.exists("/proc/%d" % child.pid) or open(
            "/proc/%d/stat" % child.pid).read().split(")")[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cache.get(child.pid)[0] is not None      # same batch: as it was
    cache.refresh()
    assert cache.get(child.pid) == cache.GONE      # a zombie has exited
    child.wait()


def test_existing_listeners_parse_proc_net(tmp_path):
    """One /proc/PID/net/tcp read per network namespace, every namespace."""
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "net").symlink_to("net:[1]")
    for pid, ns in (("7", "net:[1]"), ("8", "net:[2]")):    # 7 shares self's
        (tmp_path / pid / "ns").mkdir(parents=True)
        (tmp_path / pid / "ns" / "net").symlink_to(ns)
        (tmp_path / pid / "net").mkdir()
    (tmp_path / "8" / "net" / "tcp").write_text(
        "  sl  local_address rem_address   st\n"
        "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 9\n")
    (tmp_path / "7" / "net" / "tcp").write_text("header\n"
        "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 9\n")
    tmp_path = tmp_path / "self"
    (tmp_path / "net").mkdir()
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "net" / "tcp").write_text(head +
        "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n"
        "   1: 0100007F:1F90 0100007F:A3C2 01 00000000:00000000 00:00000000 00000000     0        0 2\n"
        "   2: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3\n")
    (tmp_path / "net" / "tcp6").write_text(head +
        "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A "
        "00000000:00000000 00:00000000 00000000     0        0 4\n")
    assert tcpstates.existing_listeners(str(tmp_path.parent)) == {
        (socket.AF_INET, 22): 2, (socket.AF_INET6, 80): 1, (socket.AF_INET, 8080): 1}


@pytest.mark.parametrize("text", ["0", "-1", "abc", "4194305", "1.5", ""])
def test_pid_arg_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        tcpstates.pid_arg(text)


def test_pid_filter_is_a_define():
    assert tcpstates.bpf_cflags(args_for("-p", "181")) == ["-DFILTER_PID=181"]


@pytest.mark.parametrize("name", [b"=HYPERLINK(1)", b"+1+1", b"-2+3", b"@SUM(A1)"])
def test_csv_defuses_spreadsheet_formulas(name):
    f = formatter("-s", "-x", procs=FakeProcs(name=tcpstates.comm_text(name.ljust(16, b"\0")),
                                              cgroup="=cgroup"))
    ev = make_event(comm=name.ljust(16, b"\0"), ocomm=name.ljust(16, b"\0"))
    row = next(csv.reader([f.row(ev)]))
    for cell in (row[2], row[-3], row[-1]):
        assert cell.startswith("'"), row
    assert row[1] == "4242" and row[-4] == "4242"       # numbers untouched
    # the table and JSON show the name unchanged (escaped only)
    table = formatter("-w").row(ev)
    assert "'" + tcpstates.comm_text(name.ljust(16, b"\0"))[:15] not in table


def test_unknown_owner_dash_is_not_prefixed_either():
    f = formatter("-s", "-x")
    row = next(csv.reader([f.row(make_event(opid=0, flags=0))]))
    assert row[-4:] == ["-", "-", "-", "-"]


def test_recursion_misses_from_prog_info():
    raw = bytearray(256)
    struct.pack_into("<Q", raw, 208, 12345)
    assert tcpstates.parse_recursion_misses(bytes(raw), 232) == 12345
    assert tcpstates.parse_recursion_misses(bytes(raw), 208) is None   # older kernel


# -- the fast row functions match the reference ---------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

EVENTS = st.builds(
    lambda fam, a, b, comm, ocomm, ts, span, flags, old, new, pid, opid, lp, rp, sk, why:
        (ts, sk, span, pid, opid, lp, rp, fam,
         old, new, flags,
         a if fam == socket.AF_INET6 else a[:4] + b"\0" * 12,
         b if fam == socket.AF_INET6 else b[:4] + b"\0" * 12,
         comm, ocomm, ts - span) + why,
    st.sampled_from([socket.AF_INET, socket.AF_INET6]),
    st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
    st.integers(2 ** 41, 2 ** 50), st.integers(0, 2 ** 40), st.integers(0, 7),
    st.integers(0, 20), st.one_of(st.just(7), st.integers(0, 20)),
    st.integers(0, 2 ** 22), st.integers(1, 2 ** 22),
    st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2 ** 64 - 1),
    # rflags, rst_reason, error, retries: what the kernel said of an end
    st.tuples(st.integers(0, 31), st.sampled_from([0, 1, 8, 11, 12, 14, 15, 16, 99]),
              st.sampled_from([0, 32, 101, 103, 104, 110, 111, 113]), st.integers(0, 65535)))
MODES = [[], ["-w"], ["-T", "-t"], ["-x"], ["-w", "-x", "-T"], ["-s"], ["-s", "-T", "-t"],
         ["-s", "-x"], ["-j"], ["--reason", "closed,timeout"], ["-s", "--reason", "refused"]]


@settings(max_examples=150, deadline=None)
@given(st.lists(EVENTS, min_size=1, max_size=5))
def test_fast_rows_equal_reference_rows(events):
    events.sort()
    for argv in MODES:
        clock = tcpstates.Clock()
        # some owners run, one was replaced by a later process, the rest exited
        procs = FakeProcs(lambda pid: (pid * 1000, "n=%d" % pid, "/cg,\"%d" % pid) if pid % 2
                          else (2 ** 51, "later", "/later") if pid % 4 == 0 else None)
        fast = formatter(*argv, clock=clock, procs=procs)
        ref = formatter(*argv, clock=tcpstates.Clock(), procs=procs)
        ref.clock.wall_minus_mono = clock.wall_minus_mono
        for ev in events:
            if ref.mode == "json":
                assert json.loads(fast.row(ev)) == json_record(ref, ev), (argv, ev)
            else:
                assert fast.row(ev) == reference_row(ref, ev), (argv, ev)


# -- reading perf rings ---------------------------------------------------------
def sample_record(ev):
    rec = struct.pack("<IHHI", tcpstates.PERF_RECORD_SAMPLE, 0, tcpstates.SAMPLE_SIZE,
                      tcpstates.EVENT_STRUCT.size + 4) + tcpstates.EVENT_STRUCT.pack(*ev)
    return rec.ljust(tcpstates.SAMPLE_SIZE, b"\0")


def lost_record(n):
    return struct.pack("<IHHQQ", tcpstates.PERF_RECORD_LOST, 0, 24, 1, n)


def test_parse_records_fast_and_slow_paths():
    evs = [tuple(make_event(ts_ns=i, lport=i)) for i in range(1, 6)]
    sink = []
    assert tcpstates.parse_records(b"".join(map(sample_record, evs)), sink) == 0
    assert sink == evs                                   # one iter_unpack call
    sink = []
    mixed = sample_record(evs[0]) + lost_record(7) + sample_record(evs[1]) + lost_record(3)
    assert tcpstates.parse_records(mixed, sink) == 10
    assert sink == evs[:2]
    sink = []
    assert tcpstates.parse_records(b"\x09\0\0\0\0\0\0\0garbage", sink) == 0   # size 0: stop
    assert sink == []


def test_ring_consume_handles_wraparound():
    """PerfRings.consume on a fake ring (a bytearray laid out like the
    kernel's mmap: one metadata page, then the data pages)."""
    page, size = tcpstates.PAGE_SIZE, tcpstates.PAGE_SIZE
    ring = bytearray(page + size)
    evs = [tuple(make_event(ts_ns=i)) for i in range(1, 4)]
    data = sample_record(evs[0]) + lost_record(5) + sample_record(evs[1]) + sample_record(evs[2])
    tail = size - 100                      # the run wraps past the ring's end
    for i, byte in enumerate(data):
        ring[page + (tail + i) % size] = byte
    struct.pack_into("<QQ", ring, 1024, tail + len(data), tail)     # data_head, data_tail
    rings = tcpstates.PerfRings.__new__(tcpstates.PerfRings)
    rings.rings = [(None, ring, size)]
    sink = []
    assert rings.consume(sink) == 5
    assert sink == evs
    assert struct.unpack_from("<Q", ring, 1032)[0] == tail + len(data)   # tail advanced
    assert rings.consume(sink) == 0 and len(sink) == 3                  # nothing new


# -- reasons -------------------------------------------------------------------
from helpers import RESET_NAMES  # noqa: E402

T = tcpstates
SENT, RECEIVED, WHY, ERR, RETRIES = (T.R_RST_SENT, T.R_RST_RECEIVED, T.R_RST_REASON,
                                     T.R_ERRNO, T.R_RETRIES)
S = {name: n for n, name in T.TCP_STATES.items()}


@pytest.mark.parametrize("old, rflags, rst, err, retries, text", [
    # the first rule that applies wins (decide_reason's docstring)
    ("LISTEN", ERR | SENT, 0, 104, 0, "listener-closed"),
    ("SYN_SENT", ERR | RETRIES, 0, 110, 2, "timeout:2-retries"),
    ("SYN_SENT", ERR | RETRIES, 0, 110, 1, "timeout:1-retry"),
    ("SYN_SENT", ERR, 0, 110, 0, "timeout"),                 # retries unknown
    ("ESTABLISHED", SENT | WHY | ERR, 15, 110, 9, "timeout:keepalive"),
    ("ESTABLISHED", SENT | WHY, 15, 0, 0, "timeout:keepalive"),
    ("ESTABLISHED", SENT | WHY | ERR, 14, 103, 0, "aborted"),   # ss -K
    ("ESTABLISHED", ERR, 0, 103, 0, "aborted"),
    ("ESTABLISHED", SENT | WHY, 11, 0, 0, "aborted"),           # unread data
    ("CLOSE_WAIT", SENT | WHY, 16, 0, 0, "aborted"),
    ("ESTABLISHED", SENT | WHY, 14, 0, 0, "reset-sent:TCP_STATE"),   # SO_LINGER 0
    ("ESTABLISHED", SENT | WHY, 0, 0, 0, "reset-sent"),         # NOT_SPECIFIED
    ("ESTABLISHED", SENT, 0, 0, 0, "reset-sent"),               # before Linux 6.10
    ("ESTABLISHED", SENT | WHY, 99, 0, 0, "reset-sent:99"),     # a name not known
    ("FIN_WAIT1", RECEIVED | SENT | WHY | ERR, 8, 104, 0, "reset-sent:TCP_ABORT_ON_DATA"),
    ("SYN_SENT", RECEIVED | ERR, 0, 111, 0, "refused"),
    ("SYN_SENT", RECEIVED, 0, 0, 0, "refused"),
    ("SYN_SENT", ERR, 0, 111, 0, "refused"),                    # ICMP port unreachable
    ("ESTABLISHED", RECEIVED | ERR, 0, 104, 0, "reset-by-peer"),
    ("CLOSE_WAIT", RECEIVED | ERR, 0, 32, 0, "reset-by-peer"),
    ("SYN_SENT", ERR, 0, 113, 0, "unreachable"),
    ("SYN_SENT", ERR, 0, 101, 0, "unreachable"),
    ("FIN_WAIT2", RETRIES, 0, 0, 0, "closed"),
    ("FIN_WAIT2", 0, 0, 0, 0, "closed"),
    ("LAST_ACK", RETRIES, 0, 0, 0, "closed"),
    ("CLOSING", RETRIES, 0, 0, 0, "closed"),
    # never a guess
    ("LAST_ACK", RETRIES, 0, 0, 1, "-"),        # an ACK after a retry, or a timeout
    ("LAST_ACK", 0, 0, 0, 0, "-"),              # retransmissions not known
    ("ESTABLISHED", ERR, 0, 104, 0, "-"),       # ECONNRESET alone: whose reset?
    ("SYN_SENT", RETRIES, 0, 0, 0, "-"),        # close() while connecting, no port
    ("FIN_WAIT1", RETRIES, 0, 0, 5, "-"),       # an orphan's timeout: no error
    ("ESTABLISHED", 0, 0, 0, 0, "-"),
])
def test_decide_reason(old, rflags, rst, err, retries, text):
    reason = T.decide_reason(S[old], T.TCP_CLOSE, rflags, rst, err, retries, RESET_NAMES)
    assert reason.text == text
    assert reason.word == (None if text == "-" else text.split(":")[0])
    assert reason.errno == (err if rflags & ERR else None)
    assert reason.retries == (retries if rflags & RETRIES else None)
    assert reason.word is None or reason.word in T.REASONS


def test_no_reason_without_a_move_to_close():
    for new in range(1, 14):
        if new != T.TCP_CLOSE:
            assert T.decide_reason(2, new, ERR | RECEIVED, 0, 111, 0, {}) is T.NO_REASON


def test_reason_phrases_for_the_journal():
    r = T.decide_reason(2, 7, ERR | RETRIES, 0, 110, 2, RESET_NAMES)
    assert r.phrase == "timed out (2 retries), errno 110"
    r = T.decide_reason(1, 7, SENT | WHY, 14, 0, 0, RESET_NAMES)
    assert (r.phrase, r.reset) == ("reset sent (TCP_STATE)", "TCP_STATE")
    r = T.decide_reason(2, 7, RECEIVED | ERR, 0, 111, 0, RESET_NAMES)
    assert r.phrase == "connection refused, errno 111"
    assert T.decide_reason(1, 7, ERR, 0, 104, 0, RESET_NAMES).phrase is None


RESET_FORMAT = '''name: tcp_send_reset
format:
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p state=%s reason=%s", REC->skbaddr, REC->state ? __print_symbolic(REC->state, { TCP_ESTABLISHED, "TCP_ESTABLISHED" }, { TCP_SYN_SENT, "TCP_SYN_SENT" }) : "UNKNOWN", __print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" }, { 1, "NO_SOCKET" }, { 11, "TCP_ABORT_ON_CLOSE" }, { 25, "MAX" })
'''


def test_reset_reasons_are_read_from_the_format():
    assert T.parse_reset_reasons(RESET_FORMAT) == {
        0: "NOT_SPECIFIED", 1: "NO_SOCKET", 11: "TCP_ABORT_ON_CLOSE", 25: "MAX"}
    # before Linux 6.10: no reason field
    assert T.parse_reset_reasons('print fmt: "skbaddr=%p", REC->skbaddr') == {}


def test_reasons_are_cached_per_facts():
    reasons = T.Reasons(RESET_NAMES)
    ev = make_event(oldstate=2, newstate=7, rflags=RECEIVED | ERR, error=111)
    assert reasons(ev).text == "refused" and reasons(tuple(ev)) is reasons(ev)
    assert reasons(make_event()) is T.NO_REASON               # not a move to CLOSE


def amendment(close, **kw):
    fields = dict(ts_ns=close.ts_ns, skaddr=close.skaddr, flags=T.AMEND)
    fields.update(kw)
    return tuple(T.Event(**{f: 0 for f in ("span_us", "pid", "opid", "lport", "rport",
                                           "family", "oldstate", "newstate", "osince")},
                         laddr=b"\0" * 16, raddr=b"\0" * 16, comm=b"\0" * 16,
                         ocomm=b"\0" * 16, **fields))


def test_amendments_merge_into_their_row():
    r = T.Reorderer()
    close = make_event(ts_ns=10, oldstate=1, newstate=7, rflags=RETRIES)
    other = make_event(ts_ns=11, skaddr=5, oldstate=1, newstate=7)
    r.pending += [tuple(close), tuple(other)]
    r.amend(amendment(close, rflags=SENT | WHY, rst_reason=11))
    r.amend(amendment(close, rflags=ERR, error=104))
    merged = T.Event._make(r.pending[0])
    assert (merged.rflags, merged.rst_reason, merged.error) == (RETRIES | SENT | WHY | ERR,
                                                                11, 104)
    assert merged[:16] == tuple(close)[:16] and r.pending[1] == tuple(other)
    # one for a row already given out (or never sent): counted late, no other row touched
    r.amend(amendment(close, ts_ns=9, rflags=ERR, error=111))
    assert r.late == 1 and T.Event._make(r.pending[0]).error == 104
    assert r.release(None)[0] == tuple(merged)


def test_readers_hand_amendments_over():
    close = make_event(ts_ns=10, oldstate=1, newstate=7)
    evs = [tuple(make_event(ts_ns=i)) for i in range(1, 4)]
    chunk = b"".join(map(sample_record, evs + [tuple(close)]))
    sink, got = [], []
    # no amendment: the fast path, one C call
    assert T.parse_records(chunk, sink, got.append) == 0 and sink == evs + [tuple(close)]
    am = amendment(close, rflags=ERR, error=110)
    sink = []
    assert T.parse_records(chunk + sample_record(am), sink, got.append) == 0
    assert sink == evs + [tuple(close)] and got == [am]
    sink = []
    assert T.parse_records(sample_record(am), sink) == 0 and sink == []   # reasons off


def facts(**kw):
    every = dict(destroy_hook=True, reset_in=True, reset_out=True, rst_reason=True,
                 rst_enum=True, error_report=True, retransmit=True, synack=True)
    every.update(kw)
    return T.KernelFacts(**every)


def test_reasons_only_cost_when_shown():
    plain = args_for()
    assert T.bpf_cflags(plain, facts()) == ["-DHAVE_TCP_DESTROY_SOCK=1"]
    assert T.bpf_hooks(plain, facts()) == [("on_set_state", T.TRACEPOINT),
                                           ("on_destroy", T.DESTROY_TRACEPOINT)]
    for argv in (["-x"], ["-j"], ["-Y"], ["--reason", "timeout"]):
        flags = T.bpf_cflags(args_for(*argv), facts())
        assert "-DWITH_REASONS=1" in flags and "-DHAVE_ERROR=1" in flags
        names = [f for f, _ in T.bpf_hooks(args_for(*argv), facts())]
        assert names == ["on_set_state", "on_destroy", "on_reset_in", "on_reset_out",
                         "on_error", "on_retransmit", "on_synack"]
        # every hook's C function exists, behind its define
        for name in names[2:]:
            define = "HAVE_%s" % name[3:].upper()
            assert "#ifdef %s\n" % define in T.BPF_PROGRAM
            assert "int %s(struct tracepoint__" % name in T.BPF_PROGRAM


def test_stuck_alone_attaches_the_retransmit_hook_for_a_connects_port():
    stuck = args_for("--stuck", "5")
    assert T.bpf_cflags(stuck, facts()) == ["-DHAVE_TCP_DESTROY_SOCK=1", "-DHAVE_RETRANSMIT=1"]
    assert [f for f, _ in T.bpf_hooks(stuck, facts())] == [
        "on_set_state", "on_destroy", "on_retransmit"]
    # without the tracepoint: nothing (the port stays 0), no failure
    assert [f for f, _ in T.bpf_hooks(stuck, facts(retransmit=False))] == [
        "on_set_state", "on_destroy"]
    # with the reasons it is there once, counting retries too
    both = args_for("--stuck", "5", "-x")
    assert [f for f, _ in T.bpf_hooks(both, facts())].count("on_retransmit") == 1
    assert T.bpf_cflags(both, facts()).count("-DHAVE_RETRANSMIT=1") == 1


def test_a_missing_tracepoint_disables_only_its_reasons():
    args = args_for("-x")
    old = facts(reset_out=False, rst_reason=False, rst_enum=False, error_report=False)
    flags = T.bpf_cflags(args, old)
    assert "-DHAVE_RESET_OUT=1" not in flags and "-DHAVE_ERROR=1" not in flags
    assert "-DHAVE_RST_REASON=1" not in flags and "-DHAVE_RESET_IN=1" in flags
    assert [f for f, _ in T.bpf_hooks(args, old)] == [
        "on_set_state", "on_destroy", "on_reset_in", "on_retransmit", "on_synack"]
    notes = "\n".join(T.reason_notes(args, old))
    assert "no tcp:tcp_send_reset tracepoint" in notes and "reset-sent is unknown" in notes
    assert "no sock:inet_sk_error_report tracepoint" in notes and "timeout" in notes
    assert T.reason_notes(args, facts()) == [
        "// reasons: every tracepoint they use is present"]
    pre610 = facts(rst_reason=False, rst_enum=False)
    assert "gives no reset reason" in "\n".join(T.reason_notes(args, pre610))
    assert "-DHAVE_RST_ENUM=1" not in T.bpf_cflags(args, pre610)
    assert T.reason_notes(args_for(), facts()) == [
        "// reasons: off (shown with -x, -j, -Y or --reason, counted with --metrics or "
        "--metrics-file)"]


def test_reason_filter_argument():
    args = args_for("--reason", "Timeout, refused,timeout")
    assert args.reasons == ("refused", "timeout")
    words = list(T.REASONS)
    assert "-DFILTER_REASONS=0x%xU" % ((1 << words.index("refused")) |
                                       (1 << words.index("timeout"))) in T.bpf_cflags(args)
    for bad in ("", "reset", "refused,", "-"):
        with pytest.raises(T.UsageError, match="unknown reason"):
            args_for("--reason", bad)
