"""Run inside a private mount namespace (see test_journal.py): a journald of
its own, the tracer with -Y, journald killed mid-run. Prints a JSON report.
Needs the repository's root on PYTHONPATH (helpers imports the tool)."""
import json
import os
import signal
import subprocess
import sys

import helpers


def journal_count(pid):
    return len(helpers.read_journal(pid))


def main():
    port = int(sys.argv[1])
    journald = subprocess.Popen(["/lib/systemd/systemd-journald"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run(port, journald)
    finally:                    # never left running when something failed
        if journald.poll() is None:
            journald.kill()
            journald.wait()


def run(port, journald):
    helpers.wait_for(lambda: os.path.exists("/run/systemd/journal/socket"), 10, 0.05)
    report = {}
    with helpers.TracerRun("-Y", "-s", "-L", str(port)) as tracer:
        helpers.tcp_session(port=port)
        tracer.wait_until(lambda ls: len(ls) >= 8, 10)
        pid = tracer.proc.pid
        helpers.wait_for(lambda: journal_count(pid) >= 7, 10, 0.1)
        report["journal_before"] = journal_count(pid)
        journald.send_signal(signal.SIGKILL)
        journald.wait()
        helpers.tcp_session(port=port)
        tracer.wait_until(lambda ls: len(ls) >= 15, 10)
        report["rc"] = tracer.stop(signal.SIGTERM)
        report["stderr"] = tracer.stderr
        report["rows"] = len(tracer.snapshot()) - 1
    print(json.dumps(report))


if __name__ == "__main__":
    main()
