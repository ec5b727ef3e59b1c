"""Count the entries of the kernel's BPF maps by name, through libbpf (as
bpftool would), to watch tcpstates' per-socket map from outside."""
import ctypes
import ctypes.util

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
    import os
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
    import os
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


def entries(name, pid=None):
    """{map id: (entries, max_entries)} for the maps with this name, only
    those of process pid if given (several tracers may run at once)."""
    import os
    owned = map_ids_of(pid) if pid else None
    result = {}
    for fd, info in maps_named(name):
        try:
            if owned is None or info.id in owned:
                result[info.id] = (count_entries(fd, info.key_size), info.max_entries)
        finally:
            os.close(fd)
    return result
