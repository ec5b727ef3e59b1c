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


@pytest.fixture(scope="session")
def journald():
    """A running journald: the machine's, or one started here (and stopped
    again at the end; one that was already running is left alone)."""
    problem = live_problem()
    if problem:
        pytest.skip("journal test needs the real kernel: " + problem)
    started = None
    if not journald_listening():
        if not os.access(JOURNALD, os.X_OK):
            pytest.skip("no %s (package systemd)" % JOURNALD)
        started = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.monotonic() + 10
        while not journald_listening():
            if time.monotonic() > deadline or started.poll() is not None:
                started.kill()
                pytest.fail("systemd-journald did not start")
            time.sleep(0.05)
    yield
    if started is not None:
        started.terminate()
        try:
            started.wait(10)
        except subprocess.TimeoutExpired:
            started.kill()
