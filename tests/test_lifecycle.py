"""--lifecycle: one row per connection when it closes, with its lifetime and
the time it spent in each state; per-state times checked against times the
test measured, one row per connection under load, the row formats."""
import json
import os
import re
import socket
import time

import pytest

import helpers
import tcpstates
from helpers import (FakeProcs, TracerRun, formatter, free_port, make_event, parse_csv,
                     run_load)

ROOT = helpers.ROOT
T = tcpstates


def client_events(sk=0x1000, t0=1_000_000_000):
    """A client's five events: SYN_SENT 0.065 ms, ESTABLISHED 250.298 ms,
    FIN_WAIT1 41.294 ms, FIN_WAIT2 0.008 ms."""
    spans = [(7, 2, 0), (2, 1, 65), (1, 4, 250298), (4, 5, 41294), (5, 7, 8)]
    evs, ts = [], t0
    for old, new, span in spans:
        ts += span * 1000
        evs.append(make_event(ts_ns=ts, skaddr=sk, oldstate=old, newstate=new, span_us=span,
                              lport=0 if old == 7 else 41365,
                              flags=T.OWNER_KNOWN | (T.SPAN_KNOWN if old != 7 else 0)))
    return evs


def lives(events, cap=T.DEFAULT_MAX_LIFECYCLES):
    life = T.Lifecycles(FakeProcs(), cap)
    return life, life.add(events)


# -- unit ----------------------------------------------------------------------
def test_a_client_gives_one_life_with_its_states():
    _l, out = lives(client_events())
    assert len(out) == 1
    life = out[0]
    assert life.states == [(2, 65), (1, 250298), (4, 41294), (5, 8)]
    assert life.lifetime_us == 65 + 250298 + 41294 + 8 and not life.at_least
    assert life.lport == 41365 and life.owner[0] == 4242


def test_unknown_span_is_unknown_and_older_sockets_are_at_least():
    evs = client_events()[2:]
    evs[0] = evs[0]._replace(flags=T.OWNER_KNOWN)          # ESTABLISHED: span unknown
    _l, out = lives(evs)
    life = out[0]
    assert life.at_least and dict(life.states)[1] is None
    assert life.lifetime_us == 41294 + 8
    assert "ESTABLISHED=? " in T.life_states_text(life.states)


def test_a_missing_transition_makes_both_states_unknown():
    evs = client_events()
    del evs[3]                                              # FIN_WAIT1 -> FIN_WAIT2 lost
    _l, out = lives(evs)
    states = dict(out[0].states)
    assert states[4] is None and states[5] is None and states[1] == 250298


def test_listeners_give_no_row_and_accepted_sockets_do():
    listener = [make_event(skaddr=1, oldstate=7, newstate=10, span_us=0, flags=0),
                make_event(skaddr=1, oldstate=10, newstate=7, span_us=5)]
    accepted = [make_event(skaddr=2, ts_ns=2_000_000_000, oldstate=10, newstate=3, span_us=0),
                make_event(skaddr=2, ts_ns=2_000_050_000, oldstate=3, newstate=1, span_us=50),
                make_event(skaddr=2, ts_ns=2_000_150_000, oldstate=1, newstate=8, span_us=100),
                make_event(skaddr=2, ts_ns=2_000_160_000, oldstate=8, newstate=9, span_us=10),
                make_event(skaddr=2, ts_ns=2_000_170_000, oldstate=9, newstate=7, span_us=10)]
    life, out = lives(listener[:1] + accepted + listener[1:])
    assert [l.skaddr for l in out] == [2]
    assert out[0].lifetime_us == 170 and not out[0].at_least
    assert [n for n, _ in out[0].states] == [3, 1, 8, 9]
    assert life.open_connections() == 0


def test_open_at_exit_counted_and_cap_evicts_oldest():
    evs = client_events(sk=1)[:3] + client_events(sk=2, t0=2_000_000_000)[:3]
    life, out = lives(evs, cap=1)
    assert out == [] and life.evicted == 1 and life.open_connections() == 1
    assert "1 still open at exit" in life.summary(0)
    assert "1 sockets dropped" in life.summary(0)


@pytest.mark.parametrize("argv", [[], ["-x"], ["-w"], ["-T", "-t", "-x"]])
def test_table_row_lines_up_with_its_header(argv):
    f = formatter(*argv)
    lf = T.LifeFormatter(f)
    row = lf.row(lives(client_events())[1][0])
    header = lf.header().split()
    assert header[-1] == "STATES" and header[-2] == "REASON"
    assert header[-3] in ("MS", "CGROUP")
    parts = row.split()
    assert len(parts) == len(header) - 1 + 4          # STATES: four words
    # REASON: why it ended, as a transition's REASON says it
    close = [ev for ev in client_events() if ev.newstate == T.TCP_CLOSE][-1]
    assert parts[len(header) - 2] == T.Reasons()(close).text
    assert row.rstrip("\n").endswith(
        "SYN_SENT=0.065 ESTABLISHED=250.298 FIN_WAIT1=41.294 FIN_WAIT2=0.008")
    # the columns before STATES start where their titles do
    head = lf.header()
    assert row.index("127.0.0.1") == head.index("LADDR")


def test_table_shows_at_least():
    life = lives(client_events())[1][0]._replace(at_least=True)
    assert " >=291.665 " in T.LifeFormatter(formatter()).row(life)


def test_csv_one_column_per_state_in_fixed_order():
    f = formatter("-s", "-x")
    lf = T.LifeFormatter(f)
    life = lives(client_events())[1][0]
    life = life._replace(states=life.states[:1] + [(1, None)] + life.states[2:])
    rows = parse_csv([lf.header(), lf.row(life)])
    states = [T.state_name(n) for n in T.LIFE_STATES]
    assert lf.header().rstrip("\n").split(",")[-len(states):] == states
    row = rows[0]
    assert row["SYN_SENT"] == "0.065" and row["ESTABLISHED"] == "-"
    assert row["CLOSE_WAIT"] == "" and row["MS"] == "291.665" and row["AT_LEAST"] == "0"
    assert row["SKADDR"] == "1000" and row["O-PID"] == "4242"


def test_json_record():
    life = lives(client_events())[1][0]
    line = T.LifeFormatter(formatter("-j")).row(life)
    rec = json.loads(line)
    assert line.startswith('{"kind":"lifecycle",')
    assert rec["states"] == {"SYN_SENT": 0.065, "ESTABLISHED": 250.298,
                             "FIN_WAIT1": 41.294, "FIN_WAIT2": 0.008}
    assert list(rec["states"]) == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
    assert rec["lifetime_ms"] == 291.665 and rec["lifetime_at_least"] is False
    assert rec["owner_pid"] == 4242 and rec["lport"] == 41365
    unknown = life._replace(owner=None, states=[(1, None)], at_least=True)
    rec = json.loads(T.LifeFormatter(formatter("-j")).row(unknown))
    assert rec["states"] == {"ESTABLISHED": None} and rec["owner_pid"] is None
    assert rec["lifetime_at_least"] is True


def test_journal_record_catalog_and_docs():
    life = lives(client_events())[1][0]
    fields = T.lifecycle_fields(life, T.Clock())
    assert fields["MESSAGE_ID"] == T.JOURNAL_LIFECYCLE_MESSAGE_ID
    assert fields["TCPSTATES_MS_ESTABLISHED"] == "250.298"
    assert fields["TCPSTATES_LIFETIME_USEC"] == "291665"
    assert all(re.fullmatch(r"[A-Z0-9_]+", k) and not k.startswith("_") for k in fields)
    catalog = open(os.path.join(ROOT, "systemd", "tcpstates.catalog")).read()
    assert "-- %s\n" % T.JOURNAL_LIFECYCLE_MESSAGE_ID in catalog
    man = open(os.path.join(ROOT, "tcpstates.8")).read()
    section = man[man.index(".SH JOURNAL FIELDS"):man.index(".SH METRICS")]
    for name in fields:
        name = re.sub(r"^TCPSTATES_MS_\w+", "TCPSTATES_MS_STATE", name)
        assert name in section, name
    fields_section = man[man.index(".SH FIELDS"):man.index(".SH JOURNAL FIELDS")]
    lifecycle = fields_section[fields_section.index(".SS LIFECYCLE ROWS"):]
    for argv in ([], ["-w", "-T", "-t", "-x"], ["-s", "-x"]):
        for title in T.LifeFormatter(formatter(*argv)).titles:
            if title in [T.state_name(n) for n in T.LIFE_STATES]:
                continue
            assert title.replace("-", "\\-") in fields_section, title
    for key in json.loads(T.LifeFormatter(formatter("-j")).row(life)):
        assert key in lifecycle, key


@pytest.mark.parametrize("argv", [["--from", "SYN_SENT"], ["--to", "CLOSE"],
                                  ["--min-span", "5"], ["--stuck", "5"]])
def test_options_that_cut_histories_are_usage_errors(argv):
    with pytest.raises(T.UsageError):
        T.parse_args(["-l"] + argv)


# -- live ----------------------------------------------------------------------
@pytest.mark.live
def test_per_state_times_match_what_the_test_timed():
    port = free_port()
    with TracerRun("-l", "-s", "-x", "-L", str(port)) as accepted, \
            TracerRun("-l", "-s", "-x", "-D", str(port)) as client:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(8)
        cli = socket.socket()
        cli.connect(("127.0.0.1", port))
        t_est = time.monotonic()
        acc, _ = srv.accept()
        time.sleep(0.300)                       # both ESTABLISHED
        t_close = time.monotonic()
        cli.close()                             # accepted CLOSE_WAIT; the client's
        # FIN_WAIT2 hands over to a time-wait mini-socket at once (no
        # tracepoint sees it), so the client's life ends here
        time.sleep(0.200)
        t_acc_close = time.monotonic()
        acc.close()                             # LAST_ACK, then CLOSE both
        t_end = time.monotonic()
        srv.close()
        mine = lambda lines: [r for r in parse_csv(lines)]
        assert client.wait_until(lambda ls: len(ls) >= 2, 10)
        assert accepted.wait_until(lambda ls: len(ls) >= 2, 10)
        assert client.stop() == 0 and accepted.stop() == 0
        crow, = mine(client.snapshot())
        arow, = mine(accepted.snapshot())
    est_ms = (t_close - t_est) * 1000
    close_wait_ms = (t_acc_close - t_close) * 1000
    assert abs(float(crow["ESTABLISHED"]) - est_ms) < 10, (crow, est_ms)
    assert float(crow["FIN_WAIT1"]) + float(crow["FIN_WAIT2"]) < 10, crow
    assert abs(float(arow["ESTABLISHED"]) - est_ms) < 10, (arow, est_ms)
    assert abs(float(arow["CLOSE_WAIT"]) - close_wait_ms) < 10, (arow, close_wait_ms)
    assert abs(float(crow["MS"]) - est_ms) < 10, crow
    assert abs(float(arow["MS"]) - (t_end - t_est) * 1000) < 10, arow
    assert crow["AT_LEAST"] == "0" and arow["AT_LEAST"] == "0"
    assert crow["SYN_SENT"] and float(crow["SYN_SENT"]) < 10
    assert crow["O-PID"] == str(os.getpid()) and arow["O-PID"] == str(os.getpid())
    assert crow["LPORT"] == str(cli_port(arow)) and crow["RPORT"] == str(port)
    assert "0 still open at exit" in client.stderr


def cli_port(accepted_row):
    return int(accepted_row["RPORT"])


@pytest.mark.live
def test_one_row_per_connection_under_load(loadgen):
    port = free_port()
    # CSV: its header shows the tracer ready (a JSON run's readiness probe
    # would be filtered out by -D)
    with TracerRun("-l", "-s", "-D", str(port)) as tracer:
        load = run_load(loadgen, port, "-n", 1000)
        n = tracer.settle(lambda ls: len(ls) - 1, load["connections"], timeout=30)
        assert tracer.stop() == 0
        rows = parse_csv(tracer.snapshot())
    # One row per connection the load made. (A burst this fast can leave a
    # connect or two of the load generator without a socket, for want of a
    # free local port: nothing happened to trace then.)
    made = load["connections"]
    assert n == made >= 990, (n, load)
    assert all(r["RPORT"] == str(port) for r in rows)
    assert len({(r["SKADDR"], r["LPORT"]) for r in rows}) == made
    s = helpers.summary(tracer.stderr)
    assert s["printed"] == made and s["lost"] == 0
    # every row a full life, unless the kernel skipped one of its events
    full = [r for r in rows if r["AT_LEAST"] == "0" and r["ESTABLISHED"] not in ("", "-")]
    assert len(full) >= made - s["skipped"] - s["gaps"]
