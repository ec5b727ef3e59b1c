#!/usr/bin/python3
"""Soak test: tcpstates under connection churn for a long time, its memory
and its per-socket map sampled, growth reported.

    /usr/bin/python3 bench/soak.py [--duration 600] [--rate 1500]
                                   [--concurrency 500] [--check]

Runs tcpstates.py -s (output read and counted through a pipe) while
bench/loadgen makes connections on loopback, paced at --rate a second with
up to --concurrency open at once, for --duration seconds. Every --every
seconds it samples the tracer's RSS and the entries of its BPF maps
("sockets", "listeners"). At the end it prints a table and one JSON line,
and with --check exits 1 if RSS grew more than --max-growth-kib after the
warm-up or the socket map did not drain back to the host's live sockets
once the churn stopped.
Needs root, like tcpstates.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import common


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, default=1500)
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--every", type=float, default=10)
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline (default: a tenth of the run, 3 s at least)")
    p.add_argument("--max-growth-kib", type=int, default=8192)
    p.add_argument("--port", type=int, default=24680)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else max(3.0, args.duration / 10)
    loadgen = common.build_loadgen()

    tracer = subprocess.Popen([sys.executable, os.path.join(common.ROOT, "tcpstates.py"), "-s"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = [0]

    def drain():
        for _ in tracer.stdout:
            lines[0] += 1
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while lines[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if lines[0] == 0:
        tracer.kill()
        sys.exit("soak: tcpstates did not start: %s" % tracer.stderr.read().decode())

    start = time.monotonic()
    load = subprocess.Popen([loadgen, "-p", str(args.port), "-n", str(10 ** 9),
                             "-c", str(args.concurrency), "-r", str(args.rate),
                             "-d", str(args.duration)], stdout=subprocess.PIPE, text=True)
    samples = []
    next_sample = start
    while load.poll() is None:
        now = time.monotonic()
        if now >= next_sample:
            socks = common.map_entries("sockets", tracer.pid)
            samples.append({
                "t": round(now - start, 1), "rss_kib": common.rss_kib(tracer.pid),
                "socket_map": max((v[0] for v in socks.values()), default=0),
                "rows": lines[0],
            })
            next_sample += args.every
        time.sleep(0.2)
    result = json.loads(load.stdout.read() or "{}")
    time.sleep(1.0)
    socks = common.map_entries("sockets", tracer.pid)
    after = {"rss_kib": common.rss_kib(tracer.pid), "live_sockets": common.live_tcp_sockets(),
             "socket_map": max((v[0] for v in socks.values()), default=0),
             "socket_map_max": max((v[1] for v in socks.values()), default=0)}
    tracer.send_signal(signal.SIGTERM)
    err = tracer.communicate(timeout=30)[1].decode().strip().splitlines()
    reader.join(10)

    base = [s for s in samples if s["t"] >= warmup] or samples[-1:]
    growth = after["rss_kib"] - base[0]["rss_kib"]
    report = {
        "duration_s": args.duration, "rate": args.rate, "concurrency": args.concurrency,
        "connections": result.get("connections"), "connect_errors": result.get("errors"),
        "rows": lines[0] - 1, "summary": err[-1] if err else "",
        "rss_kib_first": samples[0]["rss_kib"], "rss_kib_baseline": base[0]["rss_kib"],
        "rss_kib_max": max(s["rss_kib"] for s in samples + [after]),
        "rss_kib_end": after["rss_kib"], "rss_growth_kib": growth,
        "socket_map_peak": max(s["socket_map"] for s in samples),
        "socket_map_after": after["socket_map"], "socket_map_capacity": after["socket_map_max"],
        "live_tcp_sockets_after": after["live_sockets"],
        "samples": samples, "machine": common.machine(),
    }
    print("%8s %10s %12s %10s" % ("t(s)", "RSS(KiB)", "socket map", "rows"))
    for s in samples:
        print("%8.1f %10d %12d %10d" % (s["t"], s["rss_kib"], s["socket_map"], s["rows"]))
    print("after churn: RSS %d KiB (growth since %.0f s: %+d KiB), socket map %d of %d "
          "(live TCP sockets on the host: %d)"
          % (after["rss_kib"], base[0]["t"], growth, after["socket_map"], after["socket_map_max"],
             after["live_sockets"]))
    print(json.dumps(report))
    if args.check:
        # The map holds live sockets only: once the churn stops it is back to
        # (at most) the sockets still open on the host.
        ok = (growth <= args.max_growth_kib
              and after["socket_map"] <= after["live_sockets"] + 16
              and tracer.returncode == 0)
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
