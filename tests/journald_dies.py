"""Run inside a private mount namespace (see test_journal.py): a journald of
its own, the tracer with -Y, journald killed mid-run. Prints a JSON report."""
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402


def journal_count(pid):
    out = subprocess.run(["journalctl", "-o", "json", "--no-pager",
                          "SYSLOG_IDENTIFIER=tcpstates", "_PID=%d" % pid],
                         capture_output=True, text=True).stdout
    return len(out.splitlines())


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
    deadline = time.monotonic() + 10
    while not os.path.exists("/run/systemd/journal/socket") and time.monotonic() < deadline:
        time.sleep(0.05)
    report = {}
    with helpers.TracerRun("-Y", "-s", "-L", str(port)) as tracer:
        helpers.tcp_session(port=port)
        tracer.wait_until(lambda ls: len(ls) >= 8, 10)
        deadline = time.monotonic() + 10
        while journal_count(tracer.proc.pid) < 7 and time.monotonic() < deadline:
            time.sleep(0.1)
        report["journal_before"] = journal_count(tracer.proc.pid)
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
