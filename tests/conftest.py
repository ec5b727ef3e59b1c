"""Shared set-up for the tcpstates tests.

Live tests need root, BCC, tracefs and kernel headers. On a developer's
machine without them they are skipped; in CI (CI=true, or
TCPSTATES_REQUIRE_LIVE=1, which .ci/run sets) any skip is turned into a
failure, so a live test can never silently not run there.
"""
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REQUIRE_LIVE = (os.environ.get("TCPSTATES_REQUIRE_LIVE") == "1"
                or os.environ.get("CI", "").lower() == "true")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_LIVE and report.skipped:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = "skipped where live tests are required (CI): %s" % (reason,)


def live_problem():
    """Why live tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "BCC (python3-bpfcc) not importable by %s" % sys.executable
    if not any(os.path.isdir(p + "/events/sock/inet_sock_set_state")
               for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        return "tracefs not mounted or tracepoint missing (run setup.sh)"
    if not os.path.isdir("/lib/modules/%s/build" % os.uname().release):
        return "no kernel headers (run setup.sh)"
    return None


@pytest.fixture
def live():
    problem = live_problem()
    if problem:
        pytest.skip("live test needs the real kernel: " + problem)


JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNALD = "/lib/systemd/systemd-journald"


def journald_listening():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(JOURNAL_SOCKET)
        return True
    except OSError:
        return False
    finally:
        sock.close()


JOURNAL_DIRS = ("/run/systemd", "/run/systemd/journal")


def journal_entries():
    """Every path journald's sockets live in or under, that exists now."""
    found = {d for d in JOURNAL_DIRS if os.path.lexists(d)}
    for top, dirs, files in os.walk("/run/systemd/journal"):
        found.update(os.path.join(top, n) for n in dirs + files)
    return found


def remove_new_entries(before):
    """Remove what journal_entries() shows now that was not in `before`:
    the sockets (socket, stdout, dev-log, io.systemd.journal), kernel-seqnum
    and directories a journald started here made. What existed before, even
    a stale socket, is left alone; so is the journal data in /run/log."""
    for path in sorted(journal_entries() - set(before), key=len, reverse=True):
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                os.rmdir(path)      # only if empty: never another's files
            except OSError:
                pass
        else:
            os.unlink(path)


@pytest.fixture(scope="session")
def journald():
    """A running journald: the machine's, or one started here (and stopped
    again at the end, with the sockets it made removed, so that nothing
    later mistakes them for a running journald; one that was already running
    is left alone)."""
    problem = live_problem()
    if problem:
        pytest.skip("journal test needs the real kernel: " + problem)
    if journald_listening():
        yield
        return
    if not os.access(JOURNALD, os.X_OK):
        pytest.skip("no %s (package systemd)" % JOURNALD)
    before = journal_entries()
    started = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not journald_listening():
            if time.monotonic() > deadline or started.poll() is not None:
                pytest.fail("systemd-journald did not start")
            time.sleep(0.05)
        yield
    finally:
        started.terminate()
        try:
            started.wait(10)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
        remove_new_entries(before)
