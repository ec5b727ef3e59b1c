"""The program cache (warm start): a cold run compiles and keeps the
program, a warm run loads it without BCC's compiler, and every way the
cache can be wrong ends in a compile, never in a failure."""
import json
import os
import subprocess
import sys
import time

import pytest

import helpers
import tcpstates
from helpers import TOOL, TracerRun, classify, parse_csv, tcp_session, transitions

HOOKS = [("on_set_state", tcpstates.TRACEPOINT), ("on_destroy", tcpstates.DESTROY_TRACEPOINT)]


# -- unit: the key -------------------------------------------------------------
def key(**kw):
    parts = dict(bcc="0.26", release=("6.18", "x86_64"), cpus=[0, 1],
                 formats={tp: "format of %s" % tp for _n, tp in HOOKS})
    parts.update(kw)
    cflags = parts.pop("cflags", ["-DFILTER_LPORT=1"])
    return tcpstates.cache_key(cflags, HOOKS, **parts)


@pytest.mark.parametrize("change", [
    dict(cflags=["-DFILTER_RPORT=1"]),
    dict(bcc="0.27"),
    dict(release=("6.19", "x86_64")),
    dict(cpus=[0, 1, 2, 3]),
    dict(formats={tp: "format of %s, with one more field" % tp for _n, tp in HOOKS}),
])
def test_every_part_of_the_key_changes_it(change):
    assert key() == key()
    assert key(**change) != key()


def test_the_key_covers_the_program_and_the_event_layout(monkeypatch):
    before = key()
    monkeypatch.setattr(tcpstates, "BPF_PROGRAM", tcpstates.BPF_PROGRAM + "\n")
    assert key() != before
    monkeypatch.undo()
    monkeypatch.setattr(tcpstates, "EVENT_STRUCT", tcpstates.struct.Struct("<Q"))
    assert key() != before


def test_store_checks_owner_mode_and_checksum(tmp_path):
    warnings = []
    cache = tcpstates.ProgramCache(str(tmp_path / "c"), warnings.append)
    assert cache.read("k" * 64) is None and not warnings        # nothing there yet
    cache.write("k" * 64, {"maps": {}, "functions": []})
    assert oct(os.stat(tmp_path / "c").st_mode & 0o777) == "0o700"
    assert cache.read("k" * 64) == {"maps": {}, "functions": []} and not warnings
    path = tmp_path / "c" / ("k" * 64)
    path.write_bytes(path.read_bytes()[:-3])
    assert cache.read("k" * 64) is None and "damaged" in warnings.pop()
    cache.write("k" * 64, {"maps": {}, "functions": []})
    os.chmod(path, 0o666)
    assert cache.read("k" * 64) is None and "writable by others" in warnings.pop()


# -- live -------------------------------------------------------------------------
@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("CACHE_DIRECTORY", str(path))
    return path


def maps_of(pid):
    with open("/proc/%d/maps" % pid) as f:
        return f.read()


def session_rows(*argv):
    """One connection traced; the rows of its three sockets, their
    transitions, and whether the tracer had BCC's compiler loaded."""
    port = helpers.free_port()
    with TracerRun("-s", "-L", str(port), *argv) as tracer:
        compiler = "/libbcc.so" in maps_of(tracer.proc.pid)
        session = tcp_session(port=port)
        assert tracer.wait_until(lambda ls: len(parse_csv(ls)) >= 7, 10)
        assert tracer.stop() == 0
    _client, accepted, listener = classify(parse_csv(tracer.snapshot()), session)
    return (transitions(accepted), transitions(listener)), compiler, tracer.stderr


def warnings_in(stderr):
    return [line for line in stderr.splitlines() if "summary:" not in line]


@pytest.mark.live
def test_cold_run_writes_the_cache_and_warm_run_uses_it(cache_dir):
    cold, compiled, err = session_rows()
    assert compiled and not warnings_in(err)
    files = os.listdir(cache_dir)
    assert len(files) == 1 and len(files[0]) == 64
    stat = os.stat(cache_dir / files[0])
    assert stat.st_uid == 0 and stat.st_mode & 0o077 == 0
    warm, compiled, err = session_rows()
    assert not compiled, "a warm run must not load BCC's compiler (libbcc.so)"
    assert not warnings_in(err)
    assert warm == cold == (helpers.ACCEPTED_SEQUENCE, helpers.LISTENER_SEQUENCE)
    assert os.listdir(cache_dir) == files


@pytest.mark.live
def test_warm_start_imports_no_bcc(cache_dir):
    session_rows()                                   # warms the cache
    code = ("import sys, tcpstates; sys.argv[1:] = ['-L', '1', '--duration', '0.3']; "
            "rc = tcpstates.main(); assert 'bcc' not in sys.modules, 'bcc imported'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xff
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def foreign(path):
    os.chown(path, 65534, 65534)


def refused(path):
    """A well-formed entry, checksum right, that the verifier refuses."""
    body = json.loads(path.read_bytes().partition(b"\n")[2])
    for function in body["functions"]:
        function["insns"] = "lQAAAAAAAAA="           # a lone "exit": R0 not set
        function["relocs"] = {}
    import hashlib
    text = json.dumps(body, sort_keys=True).encode()
    path.write_bytes(hashlib.sha256(text).hexdigest().encode() + b"\n" + text)


@pytest.mark.live
@pytest.mark.parametrize("spoil, words", [
    (corrupt, "is damaged"), (truncate, "is damaged"),
    (foreign, "is not owned by root or is writable by others"),
    (refused, "the cached program cannot be used"),
])
def test_a_bad_cache_entry_means_one_line_and_a_compile(cache_dir, spoil, words):
    expected, _, _ = session_rows()
    path = cache_dir / os.listdir(cache_dir)[0]
    spoil(path)
    rows, compiled, err = session_rows()
    assert rows == expected and compiled
    lines = warnings_in(err)
    assert len(lines) == 1 and words in lines[0], err
    # the entry was replaced: the next run is warm and silent
    rows, compiled, err = session_rows()
    assert rows == expected and not compiled and not warnings_in(err)


@pytest.mark.live
def test_no_cache_touches_nothing(cache_dir):
    _, compiled, _ = session_rows("--no-cache")
    assert compiled and not cache_dir.exists()
    session_rows()
    (entry,) = os.listdir(cache_dir)
    before = os.stat(cache_dir / entry).st_mtime_ns
    _, compiled, err = session_rows("--no-cache")
    assert compiled and not warnings_in(err)
    assert os.stat(cache_dir / entry).st_mtime_ns == before


def run_in_private_mounts(script, *argv, env=None):
    """tcpstates.py, with a shell script run first in a private mount
    namespace (to change what the tool sees of the file system)."""
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec",
                           script + '\nexec "$@"', "sh", sys.executable, TOOL] + list(argv),
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.live
def test_read_only_cache_directory_works_quietly(tmp_path):
    env = dict(os.environ, CACHE_DIRECTORY=str(tmp_path / "ro" / "cache"))
    (tmp_path / "ro").mkdir()
    proc = run_in_private_mounts('mount --bind "%s" "%s"; mount -o remount,bind,ro "%s"'
                                 % ((tmp_path / "ro",) * 3), "-L", "1", "--duration", "0.3",
                                 env=env)
    assert proc.returncode == 0, proc.stderr
    assert warnings_in(proc.stderr) == [] and proc.stdout.startswith("SKADDR")


@pytest.mark.live
def test_a_changed_tracepoint_format_or_bcc_version_misses_the_cache(cache_dir, tmp_path):
    session_rows()
    assert len(os.listdir(cache_dir)) == 1
    fmt = os.path.join(tcpstates.find_tracefs(), "events", "sock", "inet_sock_set_state",
                       "format")
    fake_fmt = tmp_path / "format"
    fake_fmt.write_text(open(fmt).read() + "\n")
    version = os.path.join(os.path.dirname(__import__("importlib").util.find_spec("bcc").origin),
                           "version.py")
    fake_version = tmp_path / "version.py"
    fake_version.write_text("__version__ = '0.99.0'\n")
    for target, fake, count in ((fmt, fake_fmt, 2), (version, fake_version, 3)):
        proc = run_in_private_mounts('mount --bind "%s" "%s"' % (fake, target),
                                     "-L", "1", "--duration", "0.3")
        assert proc.returncode == 0 and warnings_in(proc.stderr) == [], proc.stderr
        assert len(os.listdir(cache_dir)) == count, target
