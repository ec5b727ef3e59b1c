"""Shared set-up for the tcpstates tests.

Live tests need root, BCC, tracefs and kernel headers. On a developer's
machine without them they are skipped; in CI (CI=true, or
TCPSTATES_REQUIRE_LIVE=1, which .ci/run sets) any skip is turned into a
failure, so a live test can never silently not run there.
"""
import os
import sys

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
