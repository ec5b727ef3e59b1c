"""Run inside a private mount namespace (see test_journal.py): a journald of
its own that stops taking records (SIGSTOP) while the tracer runs with -Y
and a small queue. Prints a JSON report.

  overflow  journald stalls, the queue overflows; journald resumes and the
            run goes on: what was dropped is counted and reported
  stuck     journald stalls and the tracer is stopped: it still ends within
            the stop grace, and counts what it could not send

    journald_stalls.py LOADGEN

Needs the repository's root on PYTHONPATH (helpers imports the tool)."""
import json
import os
import signal
import subprocess
import sys
import time

import helpers
import tcpstates

QUEUE = 20
CONNECTIONS = 30


def main():
    loadgen = sys.argv[1]
    journald = subprocess.Popen(["/lib/systemd/systemd-journald"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        helpers.wait_for(lambda: os.path.exists("/run/systemd/journal/socket"), 10, 0.05)
        report = {"overflow": run(loadgen, journald, stuck=False),
                  "stuck": run(loadgen, journald, stuck=True)}
    finally:                    # never left running (or stopped) when something failed
        journald.send_signal(signal.SIGCONT)
        journald.kill()
        journald.wait()
    print(json.dumps(report))


def settled_journal(pid, *match):
    """The records, once their number has stopped growing for a second."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 1 and time.monotonic() - since < 30:
        records = helpers.read_journal(pid, *match)
        if len(records) != last:
            last, since = len(records), time.monotonic()
        time.sleep(0.2)
    return helpers.read_journal(pid, *match)


def run(loadgen, journald, stuck):
    port = helpers.free_port()

    def rows(lines):
        return len(helpers.rows_for_port(helpers.parse_csv(lines), port))
    result = {}
    with helpers.TracerRun("-Y", "-s", "-L", str(port), "--journal-queue", str(QUEUE)) as tracer:
        journald.send_signal(signal.SIGSTOP)
        try:
            load = helpers.run_load(loadgen, port, "-n", CONNECTIONS, "-r", 1000)
            expected = 2 + 5 * load["connections"]           # -L: listener, accepted
            tracer.settle(rows, expected)
            time.sleep(1.2)                  # a periodic report falls in the stall
            if stuck:
                began = time.monotonic()
                result["rc"] = tracer.stop(signal.SIGTERM)
                result["stop_s"] = time.monotonic() - began
        finally:
            journald.send_signal(signal.SIGCONT)
        if not stuck:
            settled_journal(tracer.proc.pid)
            result["rc"] = tracer.stop(signal.SIGTERM)
    pid = tracer.proc.pid
    result.update(
        expected=expected, rows=rows(tracer.snapshot()), stderr=tracer.stderr,
        stored=len(settled_journal(pid, "OBJECT_TCP_SOURCE_PORT=%d" % port)),
        losses=[{k: r[k] for k in ("PRIORITY", "TCPSTATES_UNSENT", "TCPSTATES_UNSENT_TOTAL",
                                   "MESSAGE")}
                for r in helpers.read_journal(pid, "MESSAGE_ID=%s" %
                                              tcpstates.JOURNAL_LOST_MESSAGE_ID)])
    return result


if __name__ == "__main__":
    main()
