"""Shared set-up for the tcpstates tests: the `live` marker, and the
session-wide fixtures `journald` and `loadgen`.

A test that loads the BPF program (or otherwise needs root and the real
kernel) carries `@pytest.mark.live` (or `pytestmark = pytest.mark.live` for
a whole module); a test that asks for the `journald` fixture is live too.
Whether the kernel is usable is decided by the tool's own checks
(tcpstates.check_privileges and the rest): a live test is skipped with the
tool's own message when one of them fails. In CI (CI=true, or
TCPSTATES_REQUIRE_LIVE=1, which .ci/run sets) any skip is turned into a
failure, so a live test can never silently not run there.
"""
import functools
import os
import subprocess

import pytest

import helpers
import tcpstates

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


@functools.lru_cache(maxsize=None)
def live_problem():
    """Why the tool cannot run here (its own message), or None if it can.
    The checks main() makes before compiling, and the import of BCC that
    loading does."""
    try:
        tcpstates.check_privileges()
        tcpstates.check_tracepoint()
        tcpstates.check_kernel_headers()
        tcpstates.import_bcc()
    except tcpstates.Fatal as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        if "journald" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.live)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("live") is not None:
        problem = live_problem()
        if problem:
            pytest.skip("live test needs the real kernel: " + problem)


@pytest.fixture(scope="session")
def loadgen(tmp_path_factory):
    """bench/loadgen.c, compiled once for the session."""
    return helpers.build_loadgen(tmp_path_factory.mktemp("loadgen"))


# -- journald ----------------------------------------------------------------
JOURNALD = "/lib/systemd/systemd-journald"


def journald_listening():
    try:
        tcpstates.check_journald()
    except tcpstates.Fatal:
        return False
    return True


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
    is left alone). A test that uses it is live (see above)."""
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
        helpers.wait_for(lambda: journald_listening() or started.poll() is not None, 10, 0.05)
        if not journald_listening():
            pytest.fail("systemd-journald did not start")
        yield
    finally:
        started.terminate()
        try:
            started.wait(10)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
        remove_new_entries(before)
