#!/usr/bin/python3
"""Benchmark tcpstates side by side with other tracers of the same
tracepoint, on the same loopback load, interleaved (A B C A B C ...).

    /usr/bin/python3 bench/bench.py [--quick] [--journal-only] [--out FILE]
                                    [--tracer NAME=COMMAND ...]

By default it compares this tcpstates (-s), Debian's upstream
/usr/sbin/tcpstates-bpfcc -s, and a bpftrace one-liner printing a line per
state change, installing bpfcc-tools and bpftrace if they are absent. For
each it measures:

  startup   process start -> ready: the output shows a probe connection
            (a refused connect to a port of the benchmark's), made every
            20 ms from the start, so "ready" means events are flowing;
            warm (tcpstates with its program cache filled; the others
            have no cache, so warm and cold are the same for them) and
            cold (tcpstates with an empty cache directory: it compiles),
            each with the tracer's peak RSS (VmHWM) at the end of the run;
  ladder    the highest paced connection rate (bench/loadgen, 3 s at each
            rung) at which every event on the benchmark's port was captured
            (captured + reported lost = expected, lost = 0);
  cpu       the tracer's own CPU time (user + system) per captured event at
            fixed rates that every tracer keeps up with;
  storm     the slowdown of a full-speed connection storm (30,000
            connections, 7 times, the order rotating) with the tracer
            attached, against none (medians).
  journal   the -Y ladder: this tcpstates -Y and upstream's
            tcpstates-bpfcc -Y, stdout on /dev/null (as the service unit
            runs it), at paced rates for 10 s each; the records of the
            benchmark's port counted in the journal; beside them, in the same
            run and under the same load, the ceiling: a bare python-systemd
            sendv loop with the same fields, one record over and over
            ("same") and records with their own values ("distinct"). It runs
            in a private mount namespace with a journald of its own (tmpfs
            /run; the host's journald.conf and drop-ins, plus
            RateLimitIntervalSec=0: the per-unit rate limit is the unit's
            business, tested in tests/test_journal.py).

During the run net.ipv4.tcp_max_tw_buckets is 0 (restored after), so that
TIME_WAIT sockets left by earlier runs do not change the speed of later
ones; TIME_WAIT has no tracepoint, so the traced events are the same.

Results: a table on stdout and a JSON file (bench/results/ by default) with
the conditions of the run. Needs root. Not part of the test suite.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))

PY = "/usr/bin/python3"
BPFTRACE = ("bpftrace -e 'tracepoint:sock:inet_sock_set_state "
            "{ printf(\"%d %d %d %d\\n\", args->sport, args->dport, "
            "args->oldstate, args->newstate); }'")
DEFAULT_TRACERS = [
    ("tcpstates", "%s %s -s" % (PY, os.path.join(common.ROOT, "tcpstates.py"))),
    ("upstream", "/usr/sbin/tcpstates-bpfcc -s"),
    ("bpftrace", BPFTRACE),
]
EVENTS_PER_CONNECTION = 10
LISTENER_EVENTS = 2
JOURNAL_TRACERS = [
    ("tcpstates", "%s %s -Y" % (PY, os.path.join(common.ROOT, "tcpstates.py"))),
    ("upstream", "/usr/sbin/tcpstates-bpfcc -Y"),
]
JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_LOOP = os.path.join(HERE, "journal_loop.py")


def ensure_tools(tracers):
    need = []
    if any("tcpstates-bpfcc" in cmd for _n, cmd in tracers) and \
            not os.path.exists("/usr/sbin/tcpstates-bpfcc"):
        need.append("bpfcc-tools")
    if any(cmd.startswith("bpftrace") for _n, cmd in tracers) and not shutil.which("bpftrace"):
        need.append("bpftrace")
    if need:
        print("bench: installing %s" % " ".join(need), file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq"] + need, check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def free_port():
    import random
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def probe(port):
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            pass


class Running:
    """One tracer process, its stdout and stderr in files."""

    def __init__(self, command, workdir, discard=False):
        self.out_path = os.devnull if discard else os.path.join(workdir, "out")
        self.err_path = os.path.join(workdir, "err")
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, shell=True, stdout=self.out, stderr=self.err,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.pid = None

    def tracer_pid(self):
        """The tracer itself (the shell execs it, but be safe). Asked too
        early, while the shell has neither exec'd nor forked, it is the
        shell's PID, and not remembered."""
        if self.pid is None:
            try:
                kids = open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)).read().split()
                comm = open("/proc/%d/comm" % self.proc.pid).read().strip()
            except OSError:
                kids, comm = [], ""
            if not kids and comm in ("sh", "dash", "bash"):
                return self.proc.pid
            self.pid = int(kids[0]) if kids else self.proc.pid
        return self.pid

    def count(self, port):
        """Lines of output that mention the port."""
        pattern = re.compile(rb"(?<![0-9a-fA-F])%d(?![0-9a-fA-F])" % port)
        with open(self.out_path, "rb") as f:
            return sum(1 for line in f if pattern.search(line))

    def wait_ready(self, timeout=60):
        port = free_port()
        pattern = re.compile(rb"(?<![0-9a-fA-F])%d(?![0-9a-fA-F])" % port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe(port)
            self.out.flush()
            with open(self.out_path, "rb") as f:
                if pattern.search(f.read()):
                    return time.monotonic() - self.started
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("tracer never became ready: %s" % open(self.err_path).read()[-500:])

    def cpu(self):
        return common.cpu_seconds(self.tracer_pid())

    def peak_rss_kb(self):
        """The tracer's peak resident memory so far (VmHWM)."""
        try:
            with open("/proc/%d/status" % self.tracer_pid()) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def wait_quiet(self, port, expected, timeout=30):
        """Until the count reaches expected, or stops growing for 1.5 s."""
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.count(port)
            if n >= expected:
                return n
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since > 1.5:
                return n
            time.sleep(0.2)
        return self.count(port)

    def stop(self):
        # SIGINT: the one signal all three end on cleanly (upstream loses
        # its buffered output on SIGTERM).
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()
        self.err.close()
        return open(self.err_path, errors="replace").read() + open(self.out_path, errors="replace").read()[-2000:]


def reported_lost(text):
    """Lost events as each tracer reports them."""
    lost = 0
    m = re.search(r"summary: \d+ printed, (\d+) lost(?:, (?:up to )?(\d+) skipped)?"
                  r"(?:.*, (\d+) journal records not sent)?", text)
    if m:
        return sum(int(n or 0) for n in m.groups())
    for m in re.finditer(r"Possibly lost (\d+) samples", text):        # BCC's reader
        lost += int(m.group(1))
    for m in re.finditer(r"Lost (\d+) events", text):                  # bpftrace
        lost += int(m.group(1))
    return lost


def run_load(loadgen, port, *args):
    proc = subprocess.run([loadgen, "-p", str(port)] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError("loadgen failed: %s" % proc.stderr)
    return json.loads(proc.stdout)


def traced(command, fn):
    """Start a tracer, wait until it is ready, return (fn(run, ready), what
    the tracer said on stopping)."""
    work = tempfile.mkdtemp(prefix="tcpstates-bench-")
    run = Running(command, work)
    try:
        ready = run.wait_ready()
        value = fn(run, ready)
    finally:
        text = run.stop()
        shutil.rmtree(work, ignore_errors=True)
    return value, text


def cold_command(name, cmd):
    """The command that starts a tracer cold: tcpstates with an empty cache
    directory of its own (it compiles, and fills it); the others compile on
    every start anyway."""
    if name != "tcpstates":
        return cmd
    return "env CACHE_DIRECTORY=$(mktemp -d /tmp/tcpstates-bench-cache.XXXXXX) " + cmd


def measure_startup(tracers, reps):
    """Warm and cold start-up and peak RSS, interleaved (A B C A B C ...)."""
    def ready_and_rss(run, ready):
        time.sleep(0.2)
        return ready, run.peak_rss_kb()

    for name, cmd in tracers:                       # fill tcpstates' cache
        traced(cmd, lambda run, ready: ready)
    results = {name: {"warm": [], "cold": [], "warm_rss": [], "cold_rss": []}
               for name, _ in tracers}
    for _ in range(reps):
        for kind in ("warm", "cold"):
            for name, cmd in tracers:
                command = cold_command(name, cmd) if kind == "cold" else cmd
                ready, rss = traced(command, ready_and_rss)[0]
                results[name][kind].append(ready)
                results[name][kind + "_rss"].append(rss)
    for path in __import__("glob").glob("/tmp/tcpstates-bench-cache.*"):
        shutil.rmtree(path, ignore_errors=True)

    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None
    return {name: {"seconds": sorted(r["warm"]), "median": median(r["warm"]),
                   "cold_seconds": sorted(r["cold"]), "cold_median": median(r["cold"]),
                   "peak_rss_kb": median(r["warm_rss"]), "cold_peak_rss_kb": median(r["cold_rss"])}
            for name, r in results.items()}


def rung(loadgen, command, rate, seconds):
    port = free_port()

    def body(run, _ready):
        load = run_load(loadgen, port, "-r", rate, "-n", int(rate * seconds), "-d", seconds + 5)
        expected = EVENTS_PER_CONNECTION * load["connections"] + LISTENER_EVENTS
        return load, expected, run.wait_quiet(port, expected)

    (load, expected, captured), text = traced(command, body)
    lost = reported_lost(text)
    return {"rate": rate, "achieved": round(load["rate"]), "expected": expected,
            "captured": captured, "lost": lost, "ok": captured == expected and lost == 0}


def measure_ladder(loadgen, tracers, rates, seconds):
    results = {name: [] for name, _ in tracers}
    failed = set()
    for rate in rates:
        for name, cmd in tracers:
            if name in failed:
                continue
            r = rung(loadgen, cmd, rate, seconds)
            results[name].append(r)
            if not r["ok"]:
                failed.add(name)
        if len(failed) == len(tracers):
            break
    best = {}
    for name, rows in results.items():
        ok = [r["achieved"] for r in rows if r["ok"]]
        best[name] = {"highest_loss_free_rate": max(ok) if ok else 0, "rungs": rows}
    return best


def measure_cpu(loadgen, tracers, rates, seconds):
    results = {name: [] for name, _ in tracers}
    for rate in rates:
        for name, cmd in tracers:
            port = free_port()

            def body(run, _ready):
                before = run.cpu()
                load = run_load(loadgen, port, "-r", rate, "-n", int(rate * seconds),
                                "-d", seconds + 5)
                expected = EVENTS_PER_CONNECTION * load["connections"] + LISTENER_EVENTS
                run.wait_quiet(port, expected)
                used = run.cpu() - before
                # every event the tracer saw, not only the load's
                return used, expected
            (used, events), _ = traced(cmd, body)
            results[name].append({"rate": rate, "cpu_s": round(used, 3), "events": events,
                                  "us_per_event": round(used / events * 1e6, 3)})
    return {name: {"runs": rows,
                   "us_per_event": round(sum(r["cpu_s"] for r in rows) * 1e6 /
                                         sum(r["events"] for r in rows), 3)}
            for name, rows in results.items()}


def measure_storm(loadgen, tracers, connections, reps):
    runs = [("none", None)] + list(tracers)
    times = {name: [] for name, _ in runs}
    for rep in range(reps):
        # the order rotates, so that no one always follows the same other
        for name, cmd in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            if cmd is None:
                times[name].append(run_load(loadgen, free_port(), "-n", connections,
                                            "-d", 120)["seconds"])
            else:
                times[name].append(traced(cmd, lambda run, ready: run_load(
                    loadgen, free_port(), "-n", connections, "-d", 120)["seconds"])[0])
    base = sorted(times["none"])[len(times["none"]) // 2]
    out = {"none": {"seconds": times["none"], "median": base}}
    for name, _ in tracers:
        med = sorted(times[name])[len(times[name]) // 2]
        out[name] = {"seconds": times[name], "median": med,
                     "slowdown": round(med / base - 1, 3)}
    return out


# -- the -Y ladder, in a private mount namespace with a journald of its own --
def journald_settings(paths):
    """[Journal] settings of journald.conf files, later ones winning."""
    settings = {}
    for path in paths:
        with open(path) as f:
            section = None
            for line in f:
                line = line.strip()
                if line.startswith("["):
                    section = line
                elif section == "[Journal]" and "=" in line and not line.startswith(("#", ";")):
                    key, _, value = line.partition("=")
                    settings[key.strip()] = value.strip()
    return settings


def private_journald():
    """Mount tmpfs over /run and /var/log/journal (this process must be in a
    mount namespace of its own), and over /etc/systemd with the host's
    journald.conf and drop-ins plus the bench's; start journald there.
    Returns (the journald process, the conditions to record)."""
    dropin_dirs = ["/usr/lib/systemd/journald.conf.d", "/etc/systemd/journald.conf.d"]
    host = {}
    for path in ["/etc/systemd/journald.conf"] + sorted(
            os.path.join(d, n) for d in dropin_dirs if os.path.isdir(d)
            for n in os.listdir(d) if n.endswith(".conf")):
        if os.path.isfile(path):
            with open(path) as f:
                host[path] = f.read()
    for target in ("/run", "/var/log/journal", "/etc/systemd"):
        if os.path.isdir(target):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    os.makedirs("/etc/systemd/journald.conf.d")
    for path, text in host.items():
        if path.startswith("/etc/systemd/"):
            with open(path, "w") as f:
                f.write(text)
    bench_conf = "/etc/systemd/journald.conf.d/zz-tcpstates-bench.conf"
    with open(bench_conf, "w") as f:
        f.write("[Journal]\nRateLimitIntervalSec=0\n")
    order = ["/etc/systemd/journald.conf"] + sorted(
        [p for p in host if p != "/etc/systemd/journald.conf"] + [bench_conf],
        key=os.path.basename)
    journald = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists("/run/systemd/journal/socket"):
        if time.monotonic() > deadline or journald.poll() is not None:
            raise RuntimeError("journald did not start")
        time.sleep(0.05)
    version = subprocess.run(["journalctl", "--version"], capture_output=True,
                             text=True).stdout.split("\n")[0]
    with open("/proc/sys/net/unix/max_dgram_qlen") as f:
        qlen = int(f.read())
    return journald, {
        "journald": version, "config_files": [p for p in order if os.path.exists(p)],
        "settings": journald_settings(p for p in order if os.path.exists(p)),
        "storage": "tmpfs (/run/log/journal)", "net.unix.max_dgram_qlen": qlen}


def journal_stamps(*match):
    """journald's receive times (us) of the records matching match."""
    out = subprocess.run(["journalctl", "-o", "json", "--output-fields=MESSAGE_ID", "--no-pager"]
                         + list(match), capture_output=True, text=True, timeout=600).stdout
    return [int(json.loads(line)["__REALTIME_TIMESTAMP"]) for line in out.splitlines()]


def port_stamps(pid, port):
    return journal_stamps("_PID=%d" % pid, "OBJECT_TCP_SOURCE_PORT=%d" % port, "+",
                          "_PID=%d" % pid, "OBJECT_TCP_DESTINATION_PORT=%d" % port)


def journal_ready(run, timeout=60):
    """Start-up to a probe connection's record in the journal."""
    port = free_port()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe(port)
        if run.proc.poll() is not None:
            break
        if port_stamps(run.tracer_pid(), port):
            return time.monotonic() - run.started
        time.sleep(0.1)
    raise RuntimeError("tracer never recorded a probe: %s" % open(run.err_path).read()[-500:])


def wait_idle(run, timeout=120):
    """Until the tracer's CPU time stands still for a second: what it read
    has gone to journald (or been counted). Returns when it last moved."""
    last, since = run.cpu(), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = run.cpu()
        if now - last > 0.02:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1:
            break
    return since


def journal_ceiling(loadgen, journald, rate, seconds, mode):
    """The bare sendv loop for `seconds`, with the load generator at `rate`
    beside it (no tracer)."""
    identifier = "tcpstates-bench-%s-%d-%d" % (mode, rate, os.getpid())
    cpu0 = common.cpu_seconds(journald.pid)
    load = None
    if rate:
        load = subprocess.Popen([loadgen, "-p", str(free_port()), "-r", str(rate), "-n",
                                 str(int(rate * seconds)), "-d", str(seconds + 5)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    loop = json.loads(subprocess.run([PY, JOURNAL_LOOP, str(seconds), mode, identifier],
                                     capture_output=True, text=True, check=True).stdout)
    if load is not None:
        load.communicate(timeout=60)
    time.sleep(0.5)
    stored = len(journal_stamps("SYSLOG_IDENTIFIER=" + identifier))
    return {"sent": loop["sent"], "stored": stored,
            "stored_per_s": round(stored / loop["seconds"]),
            "journald_cpu_s": round(common.cpu_seconds(journald.pid) - cpu0, 2)}


def journal_rung(loadgen, journald, command, rate, seconds):
    port = free_port()
    work = tempfile.mkdtemp(prefix="tcpstates-bench-")
    run = Running(command, work, discard=True)
    try:
        ready = journal_ready(run)
        pid = run.tracer_pid()
        jcpu0, tcpu0 = common.cpu_seconds(journald.pid), run.cpu()
        began = time.time()
        load = run_load(loadgen, port, "-r", rate, "-n", int(rate * seconds), "-d", seconds + 5)
        ended, ended_mono = time.time(), time.monotonic()
        drained = wait_idle(run) - ended_mono
        jcpu, tcpu = common.cpu_seconds(journald.pid) - jcpu0, run.cpu() - tcpu0
    finally:
        text = run.stop()
        shutil.rmtree(work, ignore_errors=True)
    stamps = port_stamps(pid, port)
    during = sum(1 for t in stamps if began * 1e6 <= t <= ended * 1e6)
    expected = EVENTS_PER_CONNECTION * load["connections"] + LISTENER_EVENTS
    lost = reported_lost(text)
    return {"rate": rate, "achieved": round(load["rate"]), "expected": expected,
            "stored": len(stamps), "lost_reported": lost,
            "unaccounted": expected - len(stamps) - lost,
            "ok": len(stamps) == expected and lost == 0,
            "stored_per_s_during_load": round(during / (ended - began)),
            "load_s": round(ended - began, 2), "drain_s": round(max(drained, 0), 2),
            "tracer_cpu_s": round(tcpu, 2), "journald_cpu_s": round(jcpu, 2),
            "startup_s": round(ready, 3)}


def measure_journal(loadgen, tracers, rates, seconds):
    """The -Y ladder; run inside a private mount namespace (see main)."""
    journald, conditions = private_journald()
    try:
        rungs = []
        for rate in rates:
            print("bench: -Y at %d conn/s" % rate, file=sys.stderr)
            rung_result = {"rate": rate, "ceiling": {}, "tracers": {}}
            for mode in ("same", "distinct"):
                rung_result["ceiling"][mode] = journal_ceiling(loadgen, journald, rate,
                                                               seconds, mode)
            for name, cmd in tracers:
                rung_result["tracers"][name] = journal_rung(loadgen, journald, cmd, rate,
                                                            seconds)
            # records/s journald took from the first tracer while the load
            # ran, against the bare loops under the same load
            took = rung_result["tracers"][tracers[0][0]]["stored_per_s_during_load"]
            rung_result["of_ceiling"] = {
                mode: ratio(took, c["stored_per_s"]) for mode, c in rung_result["ceiling"].items()}
            rungs.append(rung_result)
    finally:
        journald.kill()
        journald.wait()
    best = {}
    for name, _ in tracers:
        ok = [r["tracers"][name]["achieved"] for r in rungs if r["tracers"][name]["ok"]]
        best[name] = max(ok) if ok else 0
    return {"conditions": conditions, "seconds": seconds, "rungs": rungs,
            "highest_loss_free_rate": best}


def run_journal_ladder(loadgen, tracers, rates, seconds):
    """measure_journal in a mount namespace of its own (this script again,
    under unshare): the host's /run, journal and journald stay untouched."""
    spec = json.dumps({"loadgen": loadgen, "tracers": tracers, "rates": rates,
                       "seconds": seconds})
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", PY,
                           os.path.abspath(__file__), "--journal-inner", spec],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError("the -Y ladder failed (status %d)" % proc.returncode)
    return json.loads(proc.stdout)


def print_journal(journal, first):
    c = journal["conditions"]
    names = list(journal["highest_loss_free_rate"])
    print("-Y ladder: %s s per rung, stdout on /dev/null; %s, net.unix.max_dgram_qlen %s, "
          "journald settings %s" % (journal["seconds"], c["journald"],
                                    c["net.unix.max_dgram_qlen"], c["settings"]))
    print("%-7s %13s %13s  %s" % ("conn/s", "sendv same/s", "distinct/s", "  ".join(
        "%-42s" % ("%s: stored/expected, lost, stored/s in load" % n) for n in names)))
    for r in journal["rungs"]:
        cells = []
        for n in names:
            t = r["tracers"][n]
            cells.append("%-42s" % ("%d/%d, %d%s, %d%s" % (
                t["stored"], t["expected"], t["lost_reported"],
                " (+%d unreported)" % t["unaccounted"] if t["unaccounted"] else "",
                t["stored_per_s_during_load"],
                " (%d%% of distinct)" % round(100 * r["of_ceiling"]["distinct"])
                if n == first and r["of_ceiling"]["distinct"] else "")))
        print("%-7d %13d %13d  %s" % (r["rate"], r["ceiling"]["same"]["stored_per_s"],
                                      r["ceiling"]["distinct"]["stored_per_s"],
                                      "  ".join(cells)))
    print("-Y highest loss-free rate: %s" % ", ".join(
        "%s %d conn/s" % item for item in journal["highest_loss_free_rate"].items()))


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracer", action="append", metavar="NAME=COMMAND",
                   help="a tracer to compare (repeatable); the first is the one measured "
                        "against the others")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and rungs")
    p.add_argument("--journal-only", action="store_true",
                   help="only the -Y ladder (the same as --only journal)")
    p.add_argument("--journal-tracer", action="append", metavar="NAME=COMMAND",
                   help="a -Y tracer to compare (repeatable; default: this tcpstates -Y "
                        "and upstream's tcpstates-bpfcc -Y)")
    p.add_argument("--journal-inner", help=argparse.SUPPRESS)
    p.add_argument("--out", help="JSON results file (default bench/results/bench-TIME.json)")
    p.add_argument("--only", metavar="PARTS", default="startup,ladder,cpu,storm,journal",
                   help="comma-separated parts to run (startup, ladder, cpu, storm, journal); "
                        "default all. A part left out shows as 0 in the table")
    args = p.parse_args()
    if args.journal_inner:
        spec = json.loads(args.journal_inner)
        json.dump(measure_journal(spec["loadgen"], [tuple(t) for t in spec["tracers"]],
                                  spec["rates"], spec["seconds"]), sys.stdout)
        return
    if os.geteuid() != 0:
        sys.exit("bench: needs root (the tracers load BPF programs)")
    tracers = DEFAULT_TRACERS
    if args.tracer:
        tracers = [tuple(t.split("=", 1)) for t in args.tracer]
    journal_tracers = JOURNAL_TRACERS
    if args.journal_tracer:
        journal_tracers = [tuple(t.split("=", 1)) for t in args.journal_tracer]
    ensure_tools(tracers + journal_tracers)
    subprocess.run(["bash", os.path.join(common.ROOT, "setup.sh")], check=True)
    loadgen = common.build_loadgen()
    conditions = common.machine()
    conditions["tracers"] = dict(tracers)
    conditions["journal_tracers"] = dict(journal_tracers)
    conditions["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    reps = 3 if args.quick else 5
    rates = [2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000, 20000, 24000, 28000, 32000]
    journal_rates, journal_seconds = [1000, 2000, 3000, 4000, 6000], 10
    if args.quick:
        rates = [2000, 6000, 10000, 14000, 20000]
        journal_rates, journal_seconds = [2000, 4000], 5
    # Hundreds of thousands of connections leave TIME_WAIT sockets behind,
    # and how many the kernel keeps (tcp_max_tw_buckets) changes how fast
    # the next ones are made: with none kept, every run sees the same host.
    # (TIME_WAIT has no tracepoint: the events traced are the same.)
    tw = "/proc/sys/net/ipv4/tcp_max_tw_buckets"
    saved_tw = open(tw).read().strip()
    conditions["tcp_max_tw_buckets"] = "0 during the run (was %s)" % saved_tw
    with open(tw, "w") as f:
        f.write("0")
    parts = {"journal"} if args.journal_only else set(args.only.split(","))
    names = [name for name, _ in tracers]
    startup = {n: {"median": 0, "cold_median": 0, "peak_rss_kb": 0, "cold_peak_rss_kb": 0}
               for n in names}
    ladder = {n: {"highest_loss_free_rate": 0} for n in names}
    cpu = {n: {"us_per_event": 0} for n in names}
    storm = {n: {"slowdown": 0} for n in names}
    journal = {}
    try:
        if "startup" in parts:
            print("bench: start-up", file=sys.stderr)
            startup = measure_startup(tracers, reps)
        if "ladder" in parts:
            print("bench: loss-free rate ladder", file=sys.stderr)
            ladder = measure_ladder(loadgen, tracers, rates, 3)
        if "cpu" in parts:
            print("bench: CPU per event", file=sys.stderr)
            cpu = measure_cpu(loadgen, tracers, [1000, 3000], 4)
        if "storm" in parts:
            print("bench: full-speed storm", file=sys.stderr)
            storm = measure_storm(loadgen, tracers, 30000, 3 if args.quick else 7)
        if "journal" in parts:
            print("bench: -Y ladder", file=sys.stderr)
            journal = run_journal_ladder(loadgen, journal_tracers, journal_rates,
                                         journal_seconds)
    finally:
        with open(tw, "w") as f:
            f.write(saved_tw)
    conditions["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    out = args.out or os.path.join(HERE, "results", "bench-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if parts == {"journal"}:
        with open(out, "w") as f:
            json.dump({"conditions": conditions, "journal": journal}, f, indent=1)
        print_journal(journal, journal_tracers[0][0])
        print("results: %s" % out)
        return

    first = tracers[0][0]
    table = []
    for name, _ in tracers:
        table.append({
            "tracer": name,
            "startup_s": startup[name]["median"],
            "cold_startup_s": startup[name]["cold_median"],
            "peak_rss_mb": round((startup[name]["peak_rss_kb"] or 0) / 1024, 1),
            "cold_peak_rss_mb": round((startup[name]["cold_peak_rss_kb"] or 0) / 1024, 1),
            "loss_free_rate": ladder[name]["highest_loss_free_rate"],
            "cpu_us_per_event": cpu[name]["us_per_event"],
            "storm_slowdown": storm[name]["slowdown"],
        })
    ratios = {}
    for row in table[1:]:
        ratios["%s/%s" % (first, row["tracer"])] = {
            "startup": ratio(table[0]["startup_s"], row["startup_s"]),
            "cold_startup": ratio(table[0]["cold_startup_s"], row["cold_startup_s"]),
            "peak_rss": ratio(table[0]["peak_rss_mb"], row["peak_rss_mb"]),
            "loss_free_rate": ratio(table[0]["loss_free_rate"], row["loss_free_rate"]),
            "cpu_per_event": ratio(table[0]["cpu_us_per_event"], row["cpu_us_per_event"]),
            "storm_slowdown": ratio(table[0]["storm_slowdown"], row["storm_slowdown"]),
        }
    result = {"conditions": conditions, "summary": table, "ratios": ratios,
              "startup": startup, "ladder": ladder, "cpu": cpu, "storm": storm,
              "journal": journal}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)

    print("conditions: %s, %s CPUs, kernel %s, load before %s after %s"
          % (conditions.get("cpu"), conditions.get("cpus"), conditions.get("kernel"),
             " ".join(conditions.get("loadavg_before", [])), " ".join(conditions["loadavg_after"])))
    print("%-10s %9s %9s %8s %8s %16s %13s %15s" % (
        "tracer", "warm s", "cold s", "RSS MB", "cold MB", "loss-free conn/s", "CPU us/event",
        "storm slowdown"))
    for row in table:
        print("%-10s %9.3f %9.3f %8.1f %8.1f %16d %13.3f %14.1f%%" % (
            row["tracer"], row["startup_s"], row["cold_startup_s"], row["peak_rss_mb"],
            row["cold_peak_rss_mb"], row["loss_free_rate"], row["cpu_us_per_event"],
            row["storm_slowdown"] * 100))
    for pair, r in ratios.items():
        print("%-22s start-up warm %sx cold %sx  peak RSS %sx  loss-free rate %sx  "
              "CPU/event %sx  storm slowdown %sx"
              % (pair, r["startup"], r["cold_startup"], r["peak_rss"], r["loss_free_rate"],
                 r["cpu_per_event"], r["storm_slowdown"]))
    if journal:
        print_journal(journal, journal_tracers[0][0])
    print("results: %s" % out)


if __name__ == "__main__":
    main()
