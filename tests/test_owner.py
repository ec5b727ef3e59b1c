"""Live tests of socket ownership: two real processes with known PIDs and
names, a server and a client, and the owner that tcpstates reports for
every event of their sockets."""
import os
import socket
import sys
import time

import pytest

import helpers
from helpers import (ACCEPTED_SEQUENCE, CLIENT_SEQUENCE, LISTENER_SEQUENCE, OWNER_PROCS,
                     Proc, TracerRun, parse_csv, rows_for_port, transitions, wait_rows)

pytestmark = pytest.mark.live


def peer(role, family, port, name, *extra, gated=False):
    """owner_procs.py's server or client, in its own process named name."""
    return Proc([sys.executable, OWNER_PROCS, role, "6" if family == socket.AF_INET6 else "4",
                 str(port), name] + list(extra), gated=gated)


def close_all(server, client, first="client"):
    """Close the connection in the given order, then the listener."""
    for peer in ([client, server] if first == "client" else [server, client]):
        peer.send("close")
        assert peer.read() == "closed"
        time.sleep(0.05)
    server.send("closelisten")
    assert server.read() == "closed"


def start_pair(family, port, fork=False):
    server = peer("server", family, port, "tsserver", *(["fork"] if fork else []))
    assert server.read() == "ready %d" % server.pid
    client = peer("client", family, port, "tsclient")
    client_port = int(client.read().split()[1])
    return server, client, client_port


def sockets(rows, port, client_port):
    client = [r for r in rows if r["RPORT"] == str(port)]
    accepted = [r for r in rows if r["LPORT"] == str(port) and r["RPORT"] == str(client_port)]
    listener = [r for r in rows if r["LPORT"] == str(port) and r["RPORT"] == "0"]
    return client, accepted, listener


def owner(rows):
    return {(r["O-PID"], r["O-COMM"]) for r in rows}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("first", ["client", "server"])
def test_every_event_carries_its_owner(family, first):
    port = helpers.free_port(family)
    with TracerRun("-s", "-x") as tracer:
        assert tracer.header.endswith(",MS,REASON,O-PID,O-COMM,O-FROM,CGROUP")
        server, client, client_port = start_pair(family, port)
        close_all(server, client, first)
        rows = wait_rows(tracer, [port], 12)   # while both owners are alive
        assert server.finish() == 0
        assert client.finish() == 0
        assert tracer.stop() == 0
    client_rows, accepted, listener = sockets(rows, port, client_port)
    if first == "client":
        assert transitions(client_rows) == CLIENT_SEQUENCE
        assert transitions(accepted) == ACCEPTED_SEQUENCE
    else:
        assert transitions(accepted) == [
            ("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")]
        assert transitions(client_rows) == [
            ("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "CLOSE_WAIT"),
            ("CLOSE_WAIT", "LAST_ACK"), ("LAST_ACK", "CLOSE")]
    assert transitions(listener) == LISTENER_SEQUENCE
    assert owner(client_rows) == {(str(client.pid), "tsclient")}
    assert owner(accepted) == {(str(server.pid), "tsserver")}
    assert owner(listener) == {(str(server.pid), "tsserver")}
    # An accepted socket's owner is its listener's until its own call.
    assert accepted[0]["O-FROM"] == "listener"
    assert {r["O-FROM"] for r in client_rows + listener} == {"self"}
    # The point of it: events whose on-CPU task is the other process, or
    # the idle task, still name the right owner.
    others = [r for r in client_rows if r["C-PID"] != str(client.pid)]
    others += [r for r in accepted if r["C-PID"] != str(server.pid)]
    assert others, "expected events run in another task's context"
    assert any(r["C-PID"] in (str(client.pid), str(server.pid)) for r in others)
    # cgroup of a live owner: the test's own cgroup (processes share it).
    import tcpstates
    with open("/proc/self/cgroup") as f:
        mine = tcpstates.cgroup_path(f.read().splitlines())
    assert mine and {r["CGROUP"] for r in client_rows} == {mine}


def test_socket_from_before_the_tracer_has_unknown_owner_until_closed():
    port = helpers.free_port()
    server, client, client_port = start_pair(socket.AF_INET, port)
    try:
        with TracerRun("-s", "-x") as tracer:
            close_all(server, client, first="server")
            rows = wait_rows(tracer, [port], 7)
            time.sleep(0.3)
            assert tracer.stop() == 0
    finally:
        assert server.finish() == 0
        assert client.finish() == 0
    rows = rows_for_port(parse_csv(tracer.snapshot()), port)
    client_rows, accepted, listener = sockets(rows, port, client_port)
    # The server's close is its own system call: owner known from there on.
    assert transitions(accepted) == [("ESTABLISHED", "FIN_WAIT1"), ("FIN_WAIT1", "FIN_WAIT2"),
                                     ("FIN_WAIT2", "CLOSE")]
    assert owner(accepted) == {(str(server.pid), "tsserver")}
    # The client learns of the FIN in the server's context: unknown owner,
    # never the server; then its own close names it.
    assert [(r["OLDSTATE"], r["NEWSTATE"], r["O-PID"], r["O-COMM"]) for r in client_rows] == [
        ("ESTABLISHED", "CLOSE_WAIT", "-", "-"),
        ("CLOSE_WAIT", "LAST_ACK", str(client.pid), "tsclient"),
        ("LAST_ACK", "CLOSE", str(client.pid), "tsclient")]
    assert client_rows[0]["CGROUP"] == "-"
    # Spans of sockets older than the tracer are unknown, not guessed.
    assert float(client_rows[0]["MS"]) == 0.0 and float(accepted[0]["MS"]) == 0.0
    assert owner(listener) == {(str(server.pid), "tsserver")}


def test_pid_filter_selects_by_owner():
    port = helpers.free_port()
    # The server's PID is only known once it runs, so start it first; its
    # listener then predates the tracer, and its sockets are learned from
    # its close()s and from the accepted socket's listener (learned at close
    # time for the listener itself).
    server = peer("server", socket.AF_INET, port, "tsserver")
    assert server.read().startswith("ready")
    try:
        with TracerRun("-s", "-x", "-p", str(server.pid)) as tracer:
            other = helpers.tcp_session()
            client = peer("client", socket.AF_INET, port, "tsclient")
            client_port = int(client.read().split()[1])
            close_all(server, client)
            assert client.finish() == 0
            tracer.wait_until(lambda ls: any("LISTEN,CLOSE" in l for l in ls), 10)
            time.sleep(0.3)
            assert tracer.stop() == 0
    finally:
        assert server.finish() == 0
    rows = parse_csv(tracer.snapshot())
    assert rows, tracer.snapshot()
    assert owner(rows) == {(str(server.pid), "tsserver")}
    client_rows, accepted, listener = sockets(rows, port, client_port)
    assert client_rows == []
    assert not rows_for_port(rows, other.port)
    # The listener predates the tracer, so the accepted socket's owner is
    # unknown (not guessed) until the server's own close names it.
    assert transitions(accepted) == [("CLOSE_WAIT", "LAST_ACK"), ("LAST_ACK", "CLOSE")]
    assert transitions(listener) == [("LISTEN", "CLOSE")]


def test_pid_filter_with_listener_seen_by_the_tracer():
    port = helpers.free_port()
    # The server is held before it runs, so its PID is known and its
    # listener comes after the tracer.
    server = peer("server", socket.AF_INET, port, "tsserver", gated=True)
    try:
        with TracerRun("-s", "-x", "-p", str(server.pid)) as tracer:
            server.release()
            assert server.read() == "ready %d" % server.pid
            client = peer("client", socket.AF_INET, port, "tsclient")
            client_port = int(client.read().split()[1])
            close_all(server, client)
            assert client.finish() == 0
            rows = wait_rows(tracer, [port], 7)
            time.sleep(0.3)
            assert tracer.stop() == 0
    finally:
        assert server.finish() == 0
    rows = rows_for_port(parse_csv(tracer.snapshot()), port)
    client_rows, accepted, listener = sockets(rows, port, client_port)
    assert client_rows == []
    assert transitions(accepted) == ACCEPTED_SEQUENCE
    assert transitions(listener) == LISTENER_SEQUENCE
    assert owner(rows) == {(str(server.pid), "tsserver")}


def test_forked_child_becomes_the_owner():
    port = helpers.free_port()
    with TracerRun("-s", "-x") as tracer:
        server, client, client_port = start_pair(socket.AF_INET, port, fork=True)
        child_pid = int(server.read().split()[1])
        close_all(server, client, first="server")   # the child reads "close"
        assert server.finish() == 0
        assert client.finish() == 0
        rows = wait_rows(tracer, [port], 12)
        assert tracer.stop() == 0
    _, accepted, listener = sockets(rows, port, client_port)
    by_transition = {(r["OLDSTATE"], r["NEWSTATE"]): (r["O-PID"], r["O-COMM"]) for r in accepted}
    parent = (str(server.pid), "tsserver")
    child = (str(child_pid), "tsserver-child")
    assert by_transition == {
        ("LISTEN", "SYN_RECV"): parent,
        ("SYN_RECV", "ESTABLISHED"): parent,
        ("ESTABLISHED", "FIN_WAIT1"): child,
        ("FIN_WAIT1", "FIN_WAIT2"): child,
        ("FIN_WAIT2", "CLOSE"): child,
    }
    assert owner(listener) == {parent}


def test_extended_table_columns():
    port = helpers.free_port()
    with TracerRun("-x") as tracer:
        assert tracer.header.split()[-6:] == ["MS", "REASON", "O-PID", "O-COMM", "O-FROM",
                                              "CGROUP"]
        helpers.tcp_session(port=port)
        ok = tracer.wait_until(lambda ls: sum(str(port) in l for l in ls) >= 12, 10)
        assert tracer.stop() == 0
        assert ok
    lines = [l for l in tracer.snapshot() if " %d " % port in l]
    col = tracer.header.index("O-PID")
    for line in lines:
        assert line[col:].split()[:2] == [str(os.getpid()), "python3"], line
