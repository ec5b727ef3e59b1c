"""Metrics for Prometheus (--metrics, --metrics-file, --metrics-by, -q).

Unit tests check the counting against a plain per-event reference, the
options' parsing, the optional import, the file and HTTP exporters and the
exposition text (promtool). Live tests run the tracer with a real Prometheus
server and a real node_exporter from Debian, each started here on 127.0.0.1
with a port, configuration and storage of the test's own, and stopped by it.
"""
import collections
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from hypothesis import given, settings, strategies as st

import helpers
import tcpstates
from helpers import ROOT, args_for, free_port, make_event, netns_connect, tcp_session

PROMETHEUS = "/usr/bin/prometheus"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
BOUNDS = tcpstates.DURATION_BOUNDS_US


def client():
    return pytest.importorskip("prometheus_client", reason="python3-prometheus-client")


def exposition(metrics):
    prometheus_client = client()
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return prometheus_client.generate_latest(registry).decode()


def samples(text):
    """{(sample name, frozenset of labels): value} of an exposition text."""
    from prometheus_client.parser import text_string_to_metric_families
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found, name, **labels):
    return found.get((name, frozenset(labels.items())))


# -- counting ------------------------------------------------------------------
def reference(events, by=()):
    """What the metrics must say, computed the plain way, event by event."""
    transitions, connections = collections.Counter(), collections.Counter()
    buckets, sums = collections.Counter(), collections.Counter()
    low, high = 32768, 60999
    for ev in events:
        ev = tcpstates.as_event(ev)
        labels = ()
        if "lport" in by:
            port = ev.lport
            labels += ("ephemeral" if port == 0 or low <= port <= high else str(port),)
        if "comm" in by:
            labels += (tcpstates.comm_text(ev.ocomm) if ev.flags & tcpstates.OWNER_KNOWN
                       else "-",)
        old, new = tcpstates.state_name(ev.oldstate), tcpstates.state_name(ev.newstate)
        transitions[labels + (old, new)] += 1
        if (old, new) == ("SYN_SENT", "ESTABLISHED"):
            connections[labels + ("established",)] += 1
        if (old, new) == ("SYN_SENT", "CLOSE"):
            word = tcpstates.decide_reason(ev.oldstate, ev.newstate, ev.rflags, ev.rst_reason,
                                           ev.error, ev.retries, {}).word
            connections[labels + (word or "unknown",)] += 1
        if ev.flags & tcpstates.SPAN_KNOWN:
            for bound in BOUNDS:
                if ev.span_us <= bound:
                    buckets[labels + (old, "%g" % (bound / 1e6))] += 1
            buckets[labels + (old, "+Inf")] += 1
            sums[labels + (old,)] += ev.span_us
    return transitions, connections, buckets, sums


def check_against_reference(metrics, events, by=()):
    found = samples(exposition(metrics))
    transitions, connections, buckets, sums = reference(events, by)
    names = list(by)
    got = {k: v for k, v in found.items() if k[0] == "tcpstates_transitions_total"}
    assert got == {("tcpstates_transitions_total",
                    frozenset(zip(names + ["from", "to"], key))): n
                   for key, n in transitions.items()}
    got = {k: v for k, v in found.items() if k[0] == "tcpstates_connections_total" and v}
    assert got == {("tcpstates_connections_total",
                    frozenset(zip(names + ["result"], key))): n
                   for key, n in connections.items()}
    for key, total in sums.items():
        labels = dict(zip(names + ["state"], key))
        assert value(found, "tcpstates_state_duration_seconds_sum", **labels) == \
            pytest.approx(total / 1e6, rel=1e-12, abs=1e-12)
        assert value(found, "tcpstates_state_duration_seconds_count", **labels) == \
            buckets[key + ("+Inf",)]
        for bound in BOUNDS:
            le = "%g" % (bound / 1e6)
            assert value(found, "tcpstates_state_duration_seconds_bucket", le=le, **labels) \
                == buckets[key + (le,)], (labels, le)
    histograms = {k for k in found if k[0] == "tcpstates_state_duration_seconds_count"}
    assert len(histograms) == len(sums)
    assert value(found, "tcpstates_events_total") == len(events)


# Spans at, just below and just above every bucket bound, and far beyond.
SPANS = st.one_of(st.integers(0, 700_000_000), st.sampled_from(BOUNDS),
                  st.sampled_from([b + 1 for b in BOUNDS]),
                  st.sampled_from([b - 1 for b in BOUNDS]),
                  st.integers(2 ** 40, 2 ** 47))
# What the kernel may say of a connect's end: nothing, a reset received or
# sent, an errno (timeout, refused, reset, aborted, unreachable).
FACTS = st.sampled_from([(0, 0), (tcpstates.R_RST_RECEIVED, 0), (tcpstates.R_RST_SENT, 0),
                         (tcpstates.R_RST_RECEIVED | tcpstates.R_ERRNO, 111)]
                        + [(tcpstates.R_ERRNO, e) for e in (110, 111, 104, 103, 113, 101)])
EVENTS = st.builds(
    lambda old, new, known, span, lport, owner, comm, facts: tuple(make_event(
        oldstate=old, newstate=new, span_us=span if known else 0, lport=lport,
        flags=(tcpstates.SPAN_KNOWN if known else 0) | (tcpstates.OWNER_KNOWN if owner else 0),
        ocomm=comm.ljust(16, b"\0") if owner else b"\0" * 16,
        rflags=facts[0], error=facts[1])),
    st.sampled_from([1, 2, 2, 3, 4, 7, 8, 10, 13, 14, 300]), st.sampled_from([1, 2, 5, 7, 7, 9]),
    st.booleans(), SPANS, st.sampled_from([0, 80, 443, 40000, 61000]), st.booleans(),
    st.sampled_from([b"nginx", b"curl", b"a\x1bb"]), FACTS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(EVENTS, max_size=30), max_size=6), st.integers(1, 40),
       st.sampled_from([(), ("lport",), ("comm",), ("lport", "comm")]))
def test_counts_equal_the_per_event_reference(batches, fold_at, by):
    old = tcpstates.METRICS_FOLD_AT
    tcpstates.METRICS_FOLD_AT = fold_at         # folds in the middle, too
    try:
        metrics = tcpstates.Metrics(by=by)
        for batch in batches:
            metrics.add(batch)
        check_against_reference(metrics, [ev for batch in batches for ev in batch], by)
    finally:
        tcpstates.METRICS_FOLD_AT = old


def test_counts_survive_collection_between_batches():
    metrics = tcpstates.Metrics()
    first = [make_event(oldstate=2, newstate=1, span_us=70)]
    metrics.add(first)
    exposition(metrics)
    second = [make_event(oldstate=2, newstate=1, span_us=250_000),
              make_event(oldstate=2, newstate=7, span_us=100)]
    metrics.add(second)
    check_against_reference(metrics, first + second)


def kernel_words(events):
    """The metric_counts map as the BPF program fills it (count_metrics),
    summed over CPUs: a model of the C, event by event."""
    n, nb = tcpstates.METRIC_STATES, len(BOUNDS)
    words = [0] * tcpstates.METRIC_WORDS
    for ev in events:
        ev = tcpstates.as_event(ev)
        if not (0 <= ev.oldstate < n and 0 <= ev.newstate < n):
            continue
        words[ev.oldstate * n + ev.newstate] += 1
        if ev.flags & tcpstates.SPAN_KNOWN:
            bucket = next((i for i, b in enumerate(BOUNDS) if ev.span_us <= b), nb)
            base = n * n + ev.oldstate * (nb + 2)
            words[base + bucket] += 1
            words[base + nb + 1] += ev.span_us
    return words


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(EVENTS, max_size=30), max_size=6))
def test_counts_read_from_the_kernel_equal_the_per_event_reference(batches):
    events = [ev for batch in batches for ev in batch]
    # the kernel counts states below METRIC_STATES only (Linux has 14)
    events = [ev for ev in events if ev[8] < tcpstates.METRIC_STATES
              and ev[9] < tcpstates.METRIC_STATES]
    metrics = tcpstates.Metrics(in_kernel=True)
    metrics.attach_kernel(lambda: tcpstates.metric_counts(kernel_words(events)))
    for batch in batches:
        metrics.add([ev for ev in batch if ev in events])
    assert metrics.pending == {}        # nothing kept per event
    check_against_reference(metrics, events)


def test_kernel_counts_are_kept_when_the_program_goes():
    metrics = tcpstates.Metrics(in_kernel=True)
    events = [make_event(oldstate=2, newstate=1, span_us=70),
              make_event(oldstate=2, newstate=7, span_us=100, rflags=tcpstates.R_RST_RECEIVED)]
    words = kernel_words(events)
    metrics.attach_kernel(lambda: tcpstates.metric_counts(words))
    metrics.add(events)
    metrics.detach_kernel()
    words[:] = [0] * len(words)         # the map is gone: not read again
    check_against_reference(metrics, events)
    found = samples(exposition(metrics))
    assert value(found, "tcpstates_connections_total", result="refused") == 1


def test_metric_counts_decodes_the_map_layout():
    n, nb = tcpstates.METRIC_STATES, len(BOUNDS)
    words = [0] * tcpstates.METRIC_WORDS
    words[2 * n + 1] = 5                            # SYN_SENT -> ESTABLISHED
    words[31 * n + 31] = 1                          # the last pair
    base = n * n + 2 * (nb + 2)                     # SYN_SENT's histogram
    words[base] = 3                                 # <= 100 us
    words[base + nb] = 2                            # above 600 s
    words[base + nb + 1] = 1234                     # sum, us
    words[-1] = 9                                   # state 31's sum, no count: no series
    transitions, durations = tcpstates.metric_counts(words)
    assert transitions == {(2, 1): 5, (31, 31): 1}
    assert durations == {(2,): [3] + [0] * (nb - 1) + [2, 1234]}


def test_the_kernel_counts_only_without_labels_reasons_filter_or_count():
    inside = tcpstates.metrics_in_kernel
    assert inside(args_for("--metrics", "1")) and inside(args_for("--metrics-file", "x", "-x"))
    assert not inside(args_for("-s"))
    assert not inside(args_for("--metrics", "1", "--metrics-by", "lport"))
    assert not inside(args_for("--metrics", "1", "--reason", "refused"))
    assert not inside(args_for("--metrics", "1", "--count", "5"))
    flags = tcpstates.bpf_cflags(args_for("-q", "--metrics", "1"))
    assert "-DWITH_METRICS=1" in flags and "-DMETRIC_BUCKETS=%d" % len(BOUNDS) in flags
    # failed connects are counted by reason: the reasons' hooks are built in
    assert "-DWITH_REASONS=1" in flags
    by = tcpstates.bpf_cflags(args_for("--metrics-file", "x", "--metrics-by", "comm"))
    assert "-DWITH_REASONS=1" in by and "-DWITH_METRICS=1" not in by
    assert "-DWITH_METRICS=1" not in tcpstates.bpf_cflags(args_for("-s", "-x"))
    # a different program, so a different cache entry
    hooks = [("on_set_state", tcpstates.TRACEPOINT)]
    key = functools.partial(tcpstates.cache_key, hooks=hooks, bcc="0.26", release=("6", "x"),
                            formats={}, cpus=[0, 1])
    assert key(flags) != key(by)


def test_connect_results_by_reason():
    reasons = tcpstates.Reasons(reset_names={})
    R = tcpstates
    events = [make_event(oldstate=2, newstate=1),
              make_event(oldstate=2, newstate=7, rflags=R.R_RST_RECEIVED),
              make_event(oldstate=2, newstate=7, rflags=R.R_ERRNO, error=110),
              make_event(oldstate=2, newstate=7, rflags=R.R_ERRNO, error=113),
              make_event(oldstate=2, newstate=7, rflags=R.R_ERRNO, error=103),
              make_event(oldstate=2, newstate=7, rflags=R.R_RST_SENT | R.R_RST_REASON,
                         rst_reason=3),
              make_event(oldstate=2, newstate=7),                  # given up by close()
              make_event(oldstate=2, newstate=7, rflags=R.R_ERRNO, error=104),
              make_event(oldstate=2, newstate=3),                  # simultaneous open
              make_event(oldstate=1, newstate=7, rflags=R.R_RST_RECEIVED)]
    assert tcpstates.connect_results(events, reasons) == {
        "established": 1, "refused": 1, "timeout": 1, "unreachable": 1, "aborted": 1,
        "reset-sent": 1, "unknown": 2}


def test_known_results_and_causes_are_there_before_any_event():
    found = samples(exposition(tcpstates.Metrics()))
    results = {dict(k[1])["result"]: v for k, v in found.items()
               if k[0] == "tcpstates_connections_total"}
    assert results == dict.fromkeys(["established", "refused", "timeout", "unreachable",
                                     "aborted", "reset-sent", "unknown"], 0)
    assert value(found, "tcpstates_events_total") == 0
    for cause in tcpstates.LOSS_CAUSES:
        assert value(found, "tcpstates_events_lost_total", cause=cause) == 0


def test_loss_ledger_and_an_unknown_count():
    metrics = tcpstates.Metrics()
    metrics.set_lost(perf_buffer=5, kernel_skip=None, gap=2, not_written=1, journal=3)
    found = samples(exposition(metrics))
    assert value(found, "tcpstates_events_lost_total", cause="perf_buffer") == 5
    assert value(found, "tcpstates_events_lost_total", cause="gap") == 2
    assert value(found, "tcpstates_events_lost_total", cause="not_written") == 1
    assert value(found, "tcpstates_events_lost_total", cause="journal") == 3
    # a kernel that does not report skips: no series, rather than a false 0
    assert value(found, "tcpstates_events_lost_total", cause="kernel_skip") is None


def test_stuck_gauge_only_with_stuck():
    metrics = tcpstates.Metrics()
    assert "tcpstates_stuck_sockets" not in exposition(metrics)
    metrics.set_stuck({8: 2, 2: 0})
    text = exposition(metrics)
    assert "# TYPE tcpstates_stuck_sockets gauge" in text
    found = samples(text)
    assert value(found, "tcpstates_stuck_sockets", state="CLOSE_WAIT") == 2
    assert value(found, "tcpstates_stuck_sockets", state="SYN_SENT") == 0
    metrics.set_stuck({8: 0, 2: 0})         # a gauge: it goes down again
    assert value(samples(exposition(metrics)), "tcpstates_stuck_sockets",
                 state="CLOSE_WAIT") == 0


def test_label_sets_are_capped_with_one_warning():
    warnings = []
    metrics = tcpstates.Metrics(by=("lport",), limit=3, warn=warnings.append)
    ports = [80, 81, 82, 83, 84, 40000, 0]
    metrics.add([make_event(oldstate=2, newstate=7, lport=p) for p in ports])
    metrics.add([make_event(oldstate=2, newstate=7, lport=85)])
    found = samples(exposition(metrics))
    kept = {dict(k[1])["lport"]: v for k, v in found.items()
            if k[0] == "tcpstates_transitions_total"}
    # the first three sets seen are kept; 83, 84, the ephemeral ports (40000
    # and 0) and then 85 are "other"
    assert kept == {"80": 1, "81": 1, "82": 1, "other": 5}
    assert len(warnings) == 1 and "more than 3 label sets" in warnings[0]


def test_lport_and_comm_labels():
    metrics = tcpstates.Metrics(by=("lport", "comm"), ephemeral=(32768, 60999))
    metrics.add([
        make_event(oldstate=10, newstate=3, lport=8080, ocomm=b"web".ljust(16, b"\0")),
        make_event(oldstate=7, newstate=2, lport=0, flags=0),            # owner unknown
        make_event(oldstate=2, newstate=1, lport=45000, ocomm=b"curl".ljust(16, b"\0")),
        make_event(oldstate=2, newstate=1, lport=61000, ocomm=b"\x1b[2J".ljust(16, b"\0"))])
    found = samples(exposition(metrics))
    assert value(found, "tcpstates_transitions_total", lport="8080", comm="web",
                 **{"from": "LISTEN", "to": "SYN_RECV"}) == 1
    assert value(found, "tcpstates_transitions_total", lport="ephemeral", comm="-",
                 **{"from": "CLOSE", "to": "SYN_SENT"}) == 1
    assert value(found, "tcpstates_connections_total", lport="ephemeral", comm="curl",
                 result="established") == 1
    # a name made safe, as everywhere else; a port outside the range numbered
    assert value(found, "tcpstates_connections_total", lport="61000", comm="\\x1b[2J",
                 result="established") == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (package prometheus)")
@pytest.mark.parametrize("by", [(), ("lport", "comm")])
def test_promtool_accepts_the_exposition(by):
    metrics = tcpstates.Metrics(by=by)
    metrics.add([make_event(oldstate=o, newstate=n, span_us=s, flags=f)
                 for o, n, s, f in [(2, 1, 70, 3), (2, 7, 40, 3), (1, 4, 300_000, 3),
                                    (7, 2, 0, 2), (8, 9, 10**9, 3)]])
    metrics.set_lost(perf_buffer=1, kernel_skip=2, gap=0, not_written=0, journal=0)
    metrics.set_stuck({8: 1, 2: 0})
    proc = subprocess.run(["promtool", "check", "metrics"], input=exposition(metrics),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_every_metric_has_help_and_the_conventional_name():
    text = exposition(tcpstates.Metrics())
    helps = [l.split()[2] for l in text.splitlines() if l.startswith("# HELP ")]
    types = dict(l.split()[2:4] for l in text.splitlines() if l.startswith("# TYPE "))
    assert helps == ["tcpstates_transitions_total", "tcpstates_state_duration_seconds",
                     "tcpstates_connections_total", "tcpstates_events_total",
                     "tcpstates_events_lost_total"]
    assert all(types[n] == "counter" for n in helps if n.endswith("_total"))
    assert types["tcpstates_state_duration_seconds"] == "histogram"


def test_buckets_span_100us_to_10min():
    assert BOUNDS[0] == 100 and BOUNDS[-1] == 600_000_000
    assert list(BOUNDS) == sorted(set(BOUNDS))
    # at most one bound per doubling: no bucket narrower than the noise
    assert all(b / a >= 2 for a, b in zip(BOUNDS, BOUNDS[1:]))


# -- options ---------------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [
    ("9977", ("127.0.0.1", 9977)), ("0.0.0.0:9977", ("0.0.0.0", 9977)),
    ("192.0.2.7:1", ("192.0.2.7", 1)), ("[::1]:65535", ("::1", 65535)),
    ("[::]:9977", ("::", 9977)),
])
def test_metrics_address_accepts(text, parsed):
    assert tcpstates.metrics_address(text) == parsed


@pytest.mark.parametrize("argv, words", [
    (["--metrics", ""], "invalid port"), (["--metrics", "0"], "invalid port"),
    (["--metrics", "65536"], "invalid port"), (["--metrics", "http"], "invalid port"),
    (["--metrics", ":9977"], "no address before the colon"),
    (["--metrics", "::1:9977"], "in brackets"), (["--metrics", "[::1]9977"], "[ADDR]:PORT"),
    (["--metrics", "localhost:9977"], "ADDR is an IP address"),
    (["--metrics", "[127.0.0.1]:80"], "ADDR is an IP address"),
    (["--metrics", "1.2.3:80"], "ADDR is an IP address"),
    (["--metrics", "127.0.0.1:"], "invalid port"), (["--metrics", "9977x"], "invalid port"),
    (["--metrics", "\x1b[31m:1"], "\\x1b"),
    (["--metrics", "9977", "--metrics-by", "pid"], "choose from lport,comm"),
    (["--metrics-by", "lport"], "needs --metrics or --metrics-file"),
    (["--metrics-file", ""], "invalid path"),
])
def test_bad_metrics_options_exit_2_with_one_line(argv, words, capsys):
    assert tcpstates.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpstates: argument --metrics")
    assert words in lines[0], lines[0]
    assert captured.out == ""


def test_metrics_by_order_is_fixed():
    assert args_for("--metrics", "1", "--metrics-by", "comm,lport").metrics_by == \
        ("lport", "comm")
    assert args_for("--metrics-file", "x.prom", "--metrics-by", "comm").metrics_by == ("comm",)


def test_quiet_writes_no_rows_and_no_header():
    import io
    tracer = tcpstates.Tracer(args_for("-q", "-s"), io.StringIO())
    assert tracer.write_rows is False and tracer.metrics is None


@pytest.fixture
def no_kernel(monkeypatch):
    """main() up to the compile, without root: the kernel checks pass, and
    loading is recorded instead of done."""
    monkeypatch.setattr(tcpstates, "check_privileges", lambda: None)
    monkeypatch.setattr(tcpstates, "check_tracepoint", lambda: None)
    monkeypatch.setattr(tcpstates, "check_kernel_headers", lambda: None)
    loaded = []

    def load(self):
        loaded.append(1)
        raise tcpstates.Fatal("stop here")
    monkeypatch.setattr(tcpstates.Tracer, "load", load)
    return loaded


@pytest.mark.parametrize("argv", [["--metrics", "9977"], ["--metrics-file", "/tmp/x.prom"]])
def test_missing_client_library(argv, monkeypatch, capsys, no_kernel):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    checked = []
    monkeypatch.setattr(tcpstates, "check_privileges", lambda: checked.append(1))
    assert tcpstates.main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        "tcpstates: %s needs the Prometheus client library; install "
        "python3-prometheus-client and run tcpstates with /usr/bin/python3" % argv[0]]
    assert no_kernel == [] and checked == []    # before any check, compile or attach


def test_client_library_not_imported_without_a_metrics_option():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, tcpstates; tcpstates.parse_args(['-s']); "
         "tcpstates.Tracer(tcpstates.parse_args(['-s']), sys.stdout); "
         "print('prometheus_client' in sys.modules)"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "False", proc.stderr


def test_port_in_use_ends_the_run_before_loading(no_kernel, capsys):
    client()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert tcpstates.main(["--metrics", str(port)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "tcpstates: --metrics: cannot listen on 127.0.0.1:%d: " \
        "Address already in use" % port
    assert no_kernel == []


def test_unwritable_file_ends_the_run_before_loading(no_kernel, capsys, tmp_path):
    client()
    path = tmp_path / "missing" / "tcpstates.prom"
    assert tcpstates.main(["--metrics-file", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "tcpstates: --metrics-file: cannot write %s: No such file or directory" \
        % path
    assert no_kernel == []


# -- the exporters, in process -----------------------------------------------------
def scrape(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read().decode()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_http_exporter_serves_and_stops(host):
    client()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = free_port(family)
    address = ("[%s]" % host if ":" in host else host)
    args = args_for("--metrics", "%s:%d" % (address, port))
    metrics = tcpstates.Metrics()
    metrics.add([make_event(oldstate=2, newstate=7, span_us=50)])   # no facts: unknown
    exporter = tcpstates.MetricsExporter(args, metrics, print)
    exporter.start()
    try:
        text = scrape("http://%s:%d/metrics" % (address, port))
    finally:
        exporter.close()
    found = samples(text)
    assert value(found, "tcpstates_connections_total", result="unknown") == 1
    assert any(name.startswith("process_cpu_seconds") for name, _ in found)
    with socket.socket(family) as s:        # no listener left on the port
        # (SO_REUSEADDR: the scrape's connection may be in TIME_WAIT there)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1)


def test_file_exporter_writes_atomically(tmp_path, monkeypatch):
    client()
    monkeypatch.setattr(tcpstates, "METRICS_FILE_INTERVAL_S", 0.05)
    path = tmp_path / "tcpstates.prom"
    metrics = tcpstates.Metrics()
    exporter = tcpstates.MetricsExporter(args_for("--metrics-file", str(path)), metrics, print)
    old = os.umask(0o077)
    try:
        exporter.start()
        first = path.read_text()
        metrics.add([make_event(oldstate=2, newstate=1, span_us=5)])
        assert helpers.wait_for(lambda: path.read_text() != first, 5)
        metrics.add([make_event(oldstate=2, newstate=7, span_us=5)])
    finally:
        exporter.close()
        os.umask(old)
    found = samples(path.read_text())
    assert value(found, "tcpstates_events_total") == 2        # the final write
    assert not any(name.startswith("process_") for name, _ in found)
    assert os.listdir(tmp_path) == ["tcpstates.prom"]       # no temporary left
    assert path.stat().st_mode & 0o777 == 0o644             # whatever the umask


def test_file_exporter_warns_once_when_writes_fail(tmp_path, monkeypatch):
    client()
    warnings = []
    path = tmp_path / "d" / "tcpstates.prom"
    path.parent.mkdir()
    exporter = tcpstates.MetricsExporter(args_for("--metrics-file", str(path)),
                                         tcpstates.Metrics(), warnings.append)
    monkeypatch.setattr(tcpstates, "METRICS_FILE_INTERVAL_S", 3600)
    exporter.start()
    shutil.rmtree(path.parent)
    for _ in range(3):
        exporter._write_or_warn()
    path.parent.mkdir()
    exporter.close()            # writes again, and works
    assert len(warnings) == 1 and "No such file or directory" in warnings[0]
    assert path.exists()


# -- live ----------------------------------------------------------------------------
class Daemon:
    """A server process of the test's own (Prometheus, node_exporter): its
    output in a file, stopped (and killed if need be) when the test ends."""

    def __init__(self, argv, log, ready_url, timeout=30):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.log_path = log
        ok = helpers.wait_for(lambda: self._answers(ready_url) or self.proc.poll() is not None,
                              timeout, 0.1)
        if not ok or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("%s did not start: %s" % (argv[0], self.output()[-2000:]))

    @staticmethod
    def _answers(url):
        try:
            scrape(url, timeout=2)
            return True
        except OSError:
            return False

    def output(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def need(path, package):
    if not os.access(path, os.X_OK):
        pytest.skip("no %s (package %s)" % (path, package))


def refused(port, family=socket.AF_INET):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family) as s:
        s.settimeout(5)
        assert s.connect_ex((host, port)) == 111        # ECONNREFUSED


def query(prom_port, promql):
    url = "http://127.0.0.1:%d/api/v1/query?%s" % (
        prom_port, urllib.parse.urlencode({"query": promql}))
    import json
    answer = json.loads(scrape(url))
    assert answer["status"] == "success", answer
    return answer["data"]


def scalar(prom_port, promql):
    """The one value of an instant query, or None if it has none."""
    result = query(prom_port, promql)["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


N_SESSIONS, N_REFUSED, HOLD = 4, 3, 0.3


def known_traffic(ok_port, refused_port):
    """N_SESSIONS full connections to ok_port (each ESTABLISHED for HOLD s
    and more), N_REFUSED refused connects to refused_port, one over IPv6."""
    for _ in range(N_SESSIONS):
        tcp_session(port=ok_port, hold=HOLD)
    for _ in range(N_REFUSED - 1):
        refused(refused_port)
    refused(refused_port, socket.AF_INET6)


def expected_client_counts(timeouts=0):
    """What the client sockets of known_traffic make (the tracer runs with
    -D on both ports: the accepted sockets and listeners are out of view),
    and of `timeouts` connects that time out."""
    n, m = N_SESSIONS, N_REFUSED + timeouts
    return {("CLOSE", "SYN_SENT"): n + m, ("SYN_SENT", "ESTABLISHED"): n,
            ("SYN_SENT", "CLOSE"): m, ("ESTABLISHED", "FIN_WAIT1"): n,
            ("FIN_WAIT1", "FIN_WAIT2"): n, ("FIN_WAIT2", "CLOSE"): n}


def readme_alerts():
    """The PromQL of README's alert examples (```promql blocks)."""
    import re
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```promql\n(.*?)```", f.read(), re.S)
    queries = []
    for block in blocks:
        lines = [l for l in block.splitlines() if l.strip() and not l.lstrip().startswith("#")]
        queries.append(" ".join(lines))
    return queries


@pytest.mark.live
def test_prometheus_scrapes_what_the_test_did(tmp_path):
    need(PROMETHEUS, "prometheus")
    ok_port, refused_port, timeout_port = free_port(), free_port(), free_port()
    metrics_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tcpstates\n    static_configs:\n"
        "      - targets: ['127.0.0.1:%d']\n" % metrics_port)
    # -s alone: no option that shows reasons, yet the metrics count by them
    with helpers.TracerRun("-s", "--metrics", "127.0.0.1:%d" % metrics_port,
                           "-D", "%d,%d,%d" % (ok_port, refused_port, timeout_port)) as tracer, \
            Daemon([PROMETHEUS, "--config.file=%s" % config,
                    "--storage.tsdb.path=%s" % (tmp_path / "data"),
                    "--web.listen-address=127.0.0.1:%d" % prom_port],
                   str(tmp_path / "prometheus.log"),
                   "http://127.0.0.1:%d/-/ready" % prom_port):
        assert helpers.wait_for(
            lambda: scalar(prom_port, 'up{job="tcpstates"}') == 1, 30, 0.5), \
            "Prometheus never scraped the tracer"
        known_traffic(ok_port, refused_port)
        # a connect that times out (SYN sent twice), in a network namespace
        # of its own (tcp_syn_retries 1: about 3 s)
        assert netns_connect("timeout", timeout_port) == "ETIMEDOUT"
        expected = expected_client_counts(timeouts=1)
        events = sum(expected.values())
        assert events == 5 * N_SESSIONS + 2 * N_REFUSED + 2
        assert helpers.wait_for(
            lambda: scalar(prom_port, "tcpstates_events_total") == events, 30, 0.5), \
            "Prometheus has %s events, not %d" % (
                scalar(prom_port, "tcpstates_events_total"), events)

        # the counters, as Prometheus stored them
        data = query(prom_port, "tcpstates_transitions_total")
        stored = {(r["metric"]["from"], r["metric"]["to"]): float(r["value"][1])
                  for r in data["result"]}
        assert stored == expected
        results = {r["metric"]["result"]: float(r["value"][1])
                   for r in query(prom_port, "tcpstates_connections_total")["result"]}
        assert results == dict(dict.fromkeys(tcpstates.CONNECT_RESULTS, 0),
                               established=N_SESSIONS, refused=N_REFUSED, timeout=1)
        assert scalar(prom_port, 'sum(tcpstates_transitions_total)') == events
        # the histogram: count and sum of ESTABLISHED, every one held HOLD s
        state = 'state="ESTABLISHED"'
        assert scalar(prom_port, "tcpstates_state_duration_seconds_count{%s}" % state) \
            == N_SESSIONS
        total = scalar(prom_port, "tcpstates_state_duration_seconds_sum{%s}" % state)
        assert N_SESSIONS * HOLD <= total <= N_SESSIONS * (HOLD + 0.5), total
        assert scalar(prom_port, 'tcpstates_state_duration_seconds_bucket{%s,le="0.25"}'
                      % state) == 0
        assert scalar(prom_port, 'tcpstates_state_duration_seconds_bucket{%s,le="+Inf"}'
                      % state) == N_SESSIONS
        assert scalar(prom_port, 'tcpstates_state_duration_seconds_count{state="SYN_SENT"}') \
            == N_SESSIONS + N_REFUSED + 1
        # the timed-out connect's SYN_SENT lasted its two SYNs' timeouts
        assert scalar(prom_port, 'tcpstates_state_duration_seconds_bucket{state="SYN_SENT",'
                      'le="2.5"}') == N_SESSIONS + N_REFUSED
        median = scalar(prom_port, "histogram_quantile(0.5, tcpstates_state_duration_"
                                   "seconds_bucket{%s})" % state)
        assert 0.25 <= median <= 2.5, median
        for cause in tcpstates.LOSS_CAUSES:
            assert scalar(prom_port, 'tcpstates_events_lost_total{cause="%s"}' % cause) \
                is not None, cause
        assert scalar(prom_port, 'tcpstates_events_lost_total{cause="perf_buffer"}') == 0
        # README's alert queries are valid PromQL on these series
        alerts = readme_alerts()
        assert len(alerts) == 2
        for promql in alerts:
            query(prom_port, promql)
        # the failed-connect one, without its threshold, names the reasons
        failing = alerts[0].rpartition(">")[0]
        assert "tcpstates_connections_total" in failing
        rates = {r["metric"]["result"]: float(r["value"][1])
                 for r in query(prom_port, failing)["result"]}
        assert {result for result, rate in rates.items() if rate > 0} == {"refused", "timeout"}

        # promtool on the text as the tracer serves it
        text = scrape("http://127.0.0.1:%d/metrics" % metrics_port)
        proc = subprocess.run(["promtool", "check", "metrics"], input=text,
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        # and the rows agree with the metrics
        rows = helpers.parse_csv(tracer.snapshot())
        assert len(rows) == events
        assert tracer.stop() == 0
    assert helpers.summary(tracer.stderr)["printed"] == events


@pytest.mark.live
def test_node_exporter_reads_the_file(tmp_path):
    need(NODE_EXPORTER, "prometheus-node-exporter")
    ok_port, refused_port, exporter_port = free_port(), free_port(), free_port()
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    path = textfiles / "tcpstates.prom"
    url = "http://127.0.0.1:%d/metrics" % exporter_port
    with helpers.TracerRun("-s", "--metrics-file", str(path),
                           "-D", "%d,%d" % (ok_port, refused_port)) as tracer, \
            Daemon([NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
                    "--collector.textfile.directory=%s" % textfiles,
                    "--web.listen-address=127.0.0.1:%d" % exporter_port],
                   str(tmp_path / "node_exporter.log"), url):
        known_traffic(ok_port, refused_port)
        expected = expected_client_counts()
        events = sum(expected.values())

        def exported():
            return samples(scrape(url))
        # rewritten every few seconds while it runs, and read each time
        assert helpers.wait_for(
            lambda: value(exported(), "tcpstates_events_total") == events,
            3 * tcpstates.METRICS_FILE_INTERVAL_S, 0.5)
        found = exported()
        assert value(found, "node_textfile_scrape_error") == 0
        for (old, new), n in expected.items():
            assert value(found, "tcpstates_transitions_total", **{"from": old, "to": new}) == n
        assert value(found, "tcpstates_connections_total", result="refused") == N_REFUSED
        assert value(found, "tcpstates_state_duration_seconds_count",
                     state="ESTABLISHED") == N_SESSIONS
        assert tracer.stop() == 0
        assert value(exported(), "tcpstates_events_total") == events    # the final write
    assert os.listdir(textfiles) == ["tcpstates.prom"]
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.live
def test_quiet_metrics_only_by_lport_and_comm_and_a_prompt_stop(tmp_path):
    client()
    refused_port, metrics_port = free_port(), free_port()
    url = "http://127.0.0.1:%d/metrics" % metrics_port
    path = tmp_path / "tcpstates.prom"
    with open(tmp_path / "stdout", "wb") as out, \
            helpers.TracerRun("-q", "--metrics", str(metrics_port), "--metrics-file", str(path),
                              "--metrics-by", "comm,lport", "-D", str(refused_port),
                              stdout=out) as tracer:
        def failed():
            try:
                return value(samples(scrape(url)), "tcpstates_connections_total",
                             lport="ephemeral", comm="python3", result="refused") or 0
            except OSError:
                return 0
        # -q prints nothing to wait for: connect until a failure is counted
        deadline = time.monotonic() + 60
        while failed() < 1 and time.monotonic() < deadline:
            refused(refused_port)
            time.sleep(0.2)
        assert failed() >= 1, tracer.stderr_text()
        # a stop ends it at once: the HTTP server and the file writer too
        started = time.monotonic()
        assert tracer.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 3
    assert (tmp_path / "stdout").read_bytes() == b""        # -q: no header, no rows
    printed = helpers.summary(tracer.stderr)["printed"]
    assert printed >= 2
    found = samples(path.read_text())                       # the final write
    assert value(found, "tcpstates_events_total") == printed
    assert value(found, "tcpstates_connections_total", lport="ephemeral", comm="python3",
                 result="refused") >= 1


@pytest.mark.live
def test_stuck_gauge_counts_a_close_wait_leak_and_its_end():
    client()
    port, metrics_port = free_port(), free_port()
    url = "http://127.0.0.1:%d/metrics" % metrics_port
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(4)
    acc = cli = None
    try:
        with helpers.TracerRun("-s", "-L", str(port), "--stuck", "1",
                               "--metrics", str(metrics_port)) as tracer:
            def gauge(state):
                return value(samples(scrape(url)), "tcpstates_stuck_sockets", state=state)
            cli = socket.create_connection(("127.0.0.1", port), timeout=5)
            acc, _ = srv.accept()
            cli.close()                             # acc: CLOSE_WAIT, never closed...
            assert helpers.wait_for(lambda: gauge("CLOSE_WAIT") == 1, 10, 0.2)
            assert gauge("SYN_SENT") == 0 and gauge("FIN_WAIT2") == 0   # watched, none
            assert gauge("ESTABLISHED") is None                         # not watched
            acc.close()                             # ...until now
            assert helpers.wait_for(lambda: gauge("CLOSE_WAIT") == 0, 10, 0.2)
            assert tracer.stop() == 0
    finally:
        for s in (acc, cli, srv):
            if s is not None:
                s.close()
