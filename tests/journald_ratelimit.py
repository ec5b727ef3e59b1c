"""Run inside a private mount namespace (see test_journal.py): journald's
per-unit rate limit, and the unit's setting that lifts it, without systemd
as PID 1. Prints a JSON report.

journald attributes a sender to a unit by its cgroup, and learns a unit's
LogRateLimit* settings from the symlinks that systemd makes in
/run/systemd/units/ when it starts the unit. So the tracer runs in a cgroup
named like the unit (system.slice/tcpstates.service), under a journald of
its own with a small rate limit (journald.conf in a tmpfs over
/etc/systemd), twice: once as a unit without settings, once with the
symlinks that systemd makes for the settings of systemd/tcpstates.service.

    journald_ratelimit.py LOADGEN CGROUP

Needs the repository's root on PYTHONPATH (helpers imports the tool)."""
import json
import os
import signal
import subprocess
import sys
import time

import helpers

JOURNALD = "/lib/systemd/systemd-journald"
INTERVAL_S = 2                   # the test journald.conf's RateLimitIntervalSec
DROPPED = "a596d6fe7bfa4994828e72309e95d61e"    # journald's "Suppressed N messages"
CONNECTIONS = 200


def main():
    loadgen, cgroup = sys.argv[1:3]
    with open(os.path.join(helpers.ROOT, "systemd", "tcpstates.service")) as f:
        exports = helpers.unit_rate_limit_exports(f.read())
    report = {"exports": exports}
    report["defaults"] = phase(loadgen, cgroup, {})
    report["unit"] = phase(loadgen, cgroup, exports)
    print(json.dumps(report))


def phase(loadgen, cgroup, exports):
    os.makedirs("/run/systemd/units", exist_ok=True)
    for path, value in exports.items():
        os.symlink(value, path)
    journald = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        helpers.wait_for(lambda: os.path.exists("/run/systemd/journal/socket"), 10, 0.05)
        return run(loadgen, cgroup)
    finally:                    # never left running when something failed
        journald.kill()
        journald.wait()
        for path in list(exports) + ["/run/systemd/journal/socket"]:
            if os.path.lexists(path):
                os.unlink(path)


def run(loadgen, cgroup):
    port = helpers.free_port()

    def rows(lines):
        return len(helpers.rows_for_port(helpers.parse_csv(lines), port))
    with helpers.TracerRun("-Y", "-s", "-L", str(port), cgroup=cgroup) as tracer:
        load = helpers.run_load(loadgen, port, "-n", CONNECTIONS, "-r", 2000)
        # -L: the listener's 2 events and 5 of each accepted socket.
        expected = 2 + 5 * load["connections"]
        tracer.settle(rows, expected)
        # journald reports what it dropped with the unit's first message
        # after the interval: one more connection.
        time.sleep(INTERVAL_S + 0.5)
        helpers.tcp_session(port=port)
        expected += 7
        tracer.settle(rows, expected)
        rc = tracer.stop(signal.SIGTERM)
    pid = tracer.proc.pid
    helpers.wait_for(lambda: helpers.read_journal(pid, "MESSAGE_ID=%s" % DROPPED) or
                     len(helpers.read_journal(pid)) >= expected, 5, 0.2)
    time.sleep(0.5)
    records = helpers.read_journal(pid, "OBJECT_TCP_SOURCE_PORT=%d" % port)
    out = subprocess.run(["journalctl", "-o", "json", "--no-pager", "MESSAGE_ID=" + DROPPED,
                          "OBJECT_PID=%d" % pid], capture_output=True, text=True).stdout
    dropped = [json.loads(line)["MESSAGE"] for line in out.splitlines()]
    return {"rc": rc, "stderr": tracer.stderr, "rows": rows(tracer.snapshot()),
            "expected": expected, "stored": len(records), "dropped": dropped,
            "units": sorted({r.get("_SYSTEMD_UNIT", "") for r in records})}


if __name__ == "__main__":
    main()
