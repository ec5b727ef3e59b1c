"""Shared by the benchmark and the soak test: build the load generator, read
a process's memory and CPU use, count the entries of its BPF maps."""
import ctypes
import ctypes.util
import hashlib
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")


def build_loadgen():
    """Compile loadgen.c once (per source version) and return its path."""
    src = os.path.join(HERE, "loadgen.c")
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out = os.path.join(BUILD, "loadgen-" + digest)
    if not os.path.exists(out):
        os.makedirs(BUILD, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", out + ".tmp", src], check=True)
        os.replace(out + ".tmp", out)
    return out


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """User + system CPU of a live process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine():
    """The conditions of a run, for the record."""
    info = {"kernel": os.uname().release, "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/loadavg") as f:
            info["loadavg_before"] = f.read().split()[:3]
        with open("/proc/meminfo") as f:
            info["memory_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def live_tcp_sockets():
    """Full TCP sockets on the host now (this network namespace), from
    /proc/net/tcp{,6}: TIME_WAIT entries are mini-sockets, not counted."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                count += sum(1 for line in f if line.split()[3] != "06")
        except OSError:
            pass
    return count


# -- BPF maps ----------------------------------------------------------------
# Counted by name through libbpf (as bpftool would), to watch tcpstates'
# per-socket map from outside.
_lib = None


def _libbpf():
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
        _lib.bpf_map_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
        _lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
        _lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                                ctypes.POINTER(ctypes.c_uint32)]
        _lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return _lib


class MapInfo(ctypes.Structure):       # the start of struct bpf_map_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("_rest", ctypes.c_char * 64)]


def maps_named(name):
    """[(fd, MapInfo)] of every map with this name; the caller closes fds."""
    lib = _libbpf()
    found = []
    cur, nxt = ctypes.c_uint32(0), ctypes.c_uint32(0)
    while lib.bpf_map_get_next_id(cur.value, ctypes.byref(nxt)) == 0:
        cur.value = nxt.value
        fd = lib.bpf_map_get_fd_by_id(cur.value)
        if fd < 0:
            continue
        info = MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) == 0 \
                and info.name.decode() == name:
            found.append((fd, info))
        else:
            os.close(fd)
    return found


def count_entries(fd, key_size):
    lib = _libbpf()
    key = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    count = 0
    prev = None
    while lib.bpf_map_get_next_key(fd, prev, nxt) == 0:
        count += 1
        ctypes.memmove(key, nxt, key_size)
        prev = key
    return count


def map_ids_of(pid):
    """The ids of the BPF maps a process holds open (from /proc/PID/fdinfo)."""
    ids = set()
    base = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(base):
        try:
            with open(os.path.join(base, fd)) as f:
                for line in f:
                    if line.startswith("map_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def map_entries(name, pid=None):
    """{map id: (entries, max_entries)} for the maps with this name, only
    those of process pid if given (several tracers may run at once)."""
    owned = map_ids_of(pid) if pid else None
    result = {}
    for fd, info in maps_named(name):
        try:
            if owned is None or info.id in owned:
                result[info.id] = (count_entries(fd, info.key_size), info.max_entries)
        finally:
            os.close(fd)
    return result
