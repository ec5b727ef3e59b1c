#!/usr/bin/python3
"""What the metrics cost: the tracer's CPU time per event on the CSV path,
without metrics and with them, interleaved, on the same paced loopback load.

    /usr/bin/python3 bench/metrics_cost.py [--rate N] [--seconds S] [--reps R]

Each variant runs tcpstates.py -s (rows to a file), once per repetition, in
turn: plain; with --metrics (scraped once a second, as a 1 s scrape interval
would); with --metrics --metrics-by lport,comm (scraped likewise). A run
counts the tracer's own CPU time (user + system, from /proc) over a load of
RATE connections/s for S seconds (10 events each), and divides by the events
the tracer saw (its summary's "printed"). Medians per variant, and each
variant's cost against plain. Needs root; takes about (3 x REPS x (S + 5)) s.

The BPF programs' own time is charged to whatever task is on the CPU (the
load, mostly), not to the tracer: it is measured apart, with the kernel's
BPF statistics switched on for the run (kernel.bpf_stats_enabled, set back
after), as the run_time_ns of every program the tracer holds (its
/proc/PID/fdinfo) over the same load, per event.
"""
import argparse
import os
import re
import statistics
import sys
import threading
import time
import urllib.request

import bench
import common

TOOL = os.path.join(common.ROOT, "tcpstates.py")


def scraper(port, stop):
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read()
        except OSError:
            pass


BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def bpf_run_ns(pid):
    """The run time (ns) of every BPF program the process holds open."""
    total = 0
    fds = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(fds):
        try:
            with open(os.path.join(fds, fd)) as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if "prog_type" in info and "run_time_ns" in info:
            total += int(info["run_time_ns"])
    return total


def one_run(loadgen, extra, rate, seconds):
    metrics_port = bench.free_port() if extra is not None else None
    command = "%s %s -s" % (bench.PY, TOOL)
    if metrics_port:
        command += " --metrics 127.0.0.1:%d %s" % (metrics_port, extra)

    def body(run, _ready):
        stop = threading.Event()
        thread = None
        if metrics_port:
            thread = threading.Thread(target=scraper, args=(metrics_port, stop), daemon=True)
            thread.start()
        port = bench.free_port()
        before, bpf_before = run.cpu(), bpf_run_ns(run.tracer_pid())
        load = bench.run_load(loadgen, port, "-r", rate, "-n", int(rate * seconds),
                              "-d", seconds + 5)
        expected = bench.EVENTS_PER_CONNECTION * load["connections"] + bench.LISTENER_EVENTS
        run.wait_quiet(port, expected)
        used, bpf_ns = run.cpu() - before, bpf_run_ns(run.tracer_pid()) - bpf_before
        stop.set()
        if thread:
            thread.join()
        return used, bpf_ns
    (used, bpf_ns), text = bench.traced(command, body)
    printed = int(re.search(r"summary: (\d+) printed", text).group(1))
    return used, bpf_ns, printed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=3000, help="connections per second")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("metrics_cost: needs root")
    loadgen = common.build_loadgen()
    variants = [("plain", None), ("metrics", ""), ("metrics-by", "--metrics-by lport,comm")]
    results = {name: [] for name, _ in variants}
    in_bpf = {name: [] for name, _ in variants}
    load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    with open(BPF_STATS) as f:
        stats_were = f.read().strip()
    with open(BPF_STATS, "w") as f:
        f.write("1")
    try:
        for rep in range(args.reps):
            for name, extra in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                used, bpf_ns, printed = one_run(loadgen, extra, args.rate, args.seconds)
                us = used / printed * 1e6
                results[name].append(us)
                in_bpf[name].append(bpf_ns / printed / 1e3)
                print("metrics_cost: %-10s %.3f s CPU, %d events, %.3f us/event, "
                      "BPF %.3f us/event" % (name, used, printed, us, in_bpf[name][-1]),
                      file=sys.stderr)
    finally:
        with open(BPF_STATS, "w") as f:
            f.write(stats_were)
    base = statistics.median(results["plain"])
    bpf_base = statistics.median(in_bpf["plain"])
    print("conditions: %s, %s, load %d conn/s for %d s, %d repetitions, "
          "load average %s before, %s after"
          % (time.strftime("%Y-%m-%d %H:%M"), common.machine().get("cpu"), args.rate,
             args.seconds, args.reps, load_before,
             " ".join(open("/proc/loadavg").read().split()[:3])))
    for name, _ in variants:
        med = statistics.median(results[name])
        bpf_med = statistics.median(in_bpf[name])
        print("%-10s tracer median %.3f us/event (%s)  %+.1f %%;  BPF median %.3f us/event "
              "(%s)  %+.1f %%"
              % (name, med, ", ".join("%.3f" % v for v in results[name]),
                 (med / base - 1) * 100, bpf_med,
                 ", ".join("%.3f" % v for v in in_bpf[name]), (bpf_med / bpf_base - 1) * 100))


if __name__ == "__main__":
    main()
