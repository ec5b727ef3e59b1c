"""Shared by the benchmark and the soak test: build the load generator, read
a process's memory and CPU use."""
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
