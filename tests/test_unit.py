"""Unit tests: parsing, decoding, formatting. No root, no BCC needed."""
import argparse
import csv
import io
import socket
import struct
import subprocess
import sys

import pytest

import tcpstates
from helpers import TOOL


def make_event(**kw):
    fields = dict(ts_ns=5_000_000_000, skaddr=0xffff888102ed1280, span_us=300206,
                  pid=4242, lport=41365, rport=46400,
                  laddr=socket.inet_pton(socket.AF_INET, "127.0.0.1") + b"\0" * 12,
                  raddr=socket.inet_pton(socket.AF_INET, "10.1.2.3") + b"\0" * 12,
                  family=socket.AF_INET, oldstate=1, newstate=4, flags=1,
                  comm=b"curl".ljust(16, b"\0"))
    fields.update(kw)
    return tcpstates.Event(**fields)


def v6_event(**kw):
    return make_event(family=socket.AF_INET6,
                      laddr=socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
                      raddr=socket.inet_pton(socket.AF_INET6, "fe80::abcd:ef01:2345:6789"),
                      **kw)


def args_for(*argv):
    return tcpstates.parse_args(list(argv))


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
    # u64 x3, u32, u16 x2, u8[16] x2, u16 x4, char[16]
    assert tcpstates.EVENT_STRUCT.size == 88
    raw = struct.pack("<QQQIHH16s16sHHHH16s", 1, 2, 3, 4, 5, 6, b"a" * 16,
                      b"b" * 16, 10, 7, 2, 1, b"comm")
    ev = tcpstates.decode_event(raw)
    assert (ev.ts_ns, ev.skaddr, ev.span_us, ev.pid, ev.lport, ev.rport) == (1, 2, 3, 4, 5, 6)
    assert (ev.family, ev.oldstate, ev.newstate, ev.flags) == (10, 7, 2, 1)
    assert ev.comm.rstrip(b"\0") == b"comm"


# -- formatting --------------------------------------------------------------
def test_default_row_matches_the_upstream_layout():
    f = tcpstates.Formatter(args_for())
    assert f.header() == ("SKADDR           C-PID C-COMM     LADDR           LPORT "
                          "RADDR           RPORT OLDSTATE    -> NEWSTATE    MS\n")
    assert f.row(make_event()) == (
        "ffff888102ed1280 4242  curl       127.0.0.1       41365 10.1.2.3        "
        "46400 ESTABLISHED -> FIN_WAIT1   300.206\n")


@pytest.mark.parametrize("argv", [[], ["-w"], ["-T"], ["-t"], ["-T", "-t", "-w"]])
def test_columns_line_up_with_the_header(argv):
    f = tcpstates.Formatter(args_for(*argv))
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
    f = tcpstates.Formatter(args_for("-w"))
    fields = f.row(v6_event()).split()
    assert fields[3:8] == ["6", "2001:db8::1", "41365", "fe80::abcd:ef01:2345:6789", "46400"]


def test_time_and_timestamp_come_from_the_event():
    clock = tcpstates.Clock()
    clock.wall_minus_mono = 1_700_000_000 * 10 ** 9 - 5 * 10 ** 9
    f = tcpstates.Formatter(args_for("-T", "-t"), clock)
    first = f.row(make_event(ts_ns=5_000_000_000)).split()
    later = f.row(make_event(ts_ns=6_250_000_000)).split()
    import time
    assert first[0] == time.strftime("%H:%M:%S", time.localtime(1_700_000_000))
    assert later[0] == time.strftime("%H:%M:%S", time.localtime(1_700_000_001))
    assert (first[1], later[1]) == ("0.000000", "1.250000")


def test_csv_header_and_row():
    f = tcpstates.Formatter(args_for("-s", "-T", "-t"))
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
    f = tcpstates.Formatter(args_for("-w"))
    line = f.row(make_event(comm=name[:16].ljust(16, b"\0")))
    assert line.endswith("\n") and line.count("\n") == 1
    assert all(ch.isprintable() for ch in line[:-1]), repr(line)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_round_trip_through_csv(name):
    f = tcpstates.Formatter(args_for("-s"))
    text = f.header() + f.row(make_event(comm=name[:16].ljust(16, b"\0")))
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == 2 and len(rows[1]) == 11
    assert rows[1][2] == tcpstates.comm_text(name[:16].ljust(16, b"\0"))
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
    assert len(tcpstates._comm_cache) <= 4097


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
    assert out.startswith("// cflags: -DFILTER_FAMILY=2 -DFILTER_LPORT=1\n")
    assert "// local_ports map: 80,443\n" in out
    assert "TRACEPOINT_PROBE(sock, inet_sock_set_state)" in out


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
