"""Gaps: a transition missing from a socket's history is found and counted,
both by the chain check (a socket leaves a state it was not seen to enter)
and by tcp_destroy_sock (a socket destroyed before its CLOSE was seen).
--test-skip makes the program drop transitions into one state, as the
kernel does when it skips a run."""
import socket

import pytest

import helpers
from helpers import TracerRun, parse_csv, rows_for_port, tcp_session

pytestmark = pytest.mark.live


def run_one_session(*argv):
    port = helpers.free_port()
    with TracerRun("-s", "-L", str(port), *argv) as tracer:
        tcp_session(port=port)
        tracer.settle(lambda ls: len(rows_for_port(parse_csv(ls), port)), 7, quiet=1.0)
        assert tracer.stop() == 0
    return rows_for_port(parse_csv(tracer.snapshot()), port), helpers.summary(tracer.stderr)


def test_no_gap_without_a_skip():
    rows, numbers = run_one_session()
    assert len(rows) == 7 and numbers["gaps"] == 0


def test_a_skipped_middle_transition_is_a_gap():
    # the accepted socket: ESTABLISHED -> CLOSE_WAIT is dropped, so its
    # CLOSE_WAIT -> LAST_ACK comes from a state it was never seen to enter
    rows, numbers = run_one_session("--test-skip", "CLOSE_WAIT")
    assert ("ESTABLISHED", "CLOSE_WAIT") not in helpers.transitions(rows)
    assert len(rows) == 6
    assert numbers["gaps"] == 1, numbers


def test_a_skipped_close_is_a_gap_at_destruction():
    # the listener's LISTEN -> CLOSE and the accepted socket's LAST_ACK ->
    # CLOSE are dropped: both sockets are destroyed while still known
    rows, numbers = run_one_session("--test-skip", "CLOSE")
    assert len(rows) == 5
    assert numbers["gaps"] == 2, numbers


def test_gaps_count_only_sockets_in_view():
    # the same skips on another port are not this view's gaps
    port = helpers.free_port()
    with TracerRun("-s", "-L", str(port), "--test-skip", "CLOSE_WAIT") as tracer:
        other = tcp_session()
        tcp_session(port=port)
        tracer.settle(lambda ls: len(rows_for_port(parse_csv(ls), port)), 6, quiet=1.0)
        assert tracer.stop() == 0
    assert not rows_for_port(parse_csv(tracer.snapshot()), other.port)
    assert helpers.summary(tracer.stderr)["gaps"] == 1
