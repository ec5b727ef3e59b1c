"""Real processes with known PIDs and names, for the ownership tests
(test_owner.py, test_trust.py). Each reports on stdout and obeys lines read
from stdin.

    owner_procs.py server FAMILY PORT NAME [fork]
        Named NAME: listens on PORT of the loopback address of FAMILY (4 or
        6), says "ready PID", accepts one connection, reads its first bytes
        and answers "pong". "close" closes the connection ("closed"),
        "closelisten" the listener ("closed"), then "exit". With "fork" it
        hands the accepted socket to a forked child named NAME-child, which
        says "child PID" and obeys the next "close"; the server closes its
        own copy at once and waits for the child.

    owner_procs.py client FAMILY PORT NAME
        Named NAME: connects to PORT, says "connected LPORT", sends "ping",
        reads the answer. "close" closes it ("closed"), then "exit".

    owner_procs.py forklisten PORT
        Named "tsparent": listens on 127.0.0.1:PORT, says "ready PID". On
        "fork" it forks a child named "tschild", which says "child PID"; the
        parent then exits at once (the child keeps the listener). The child
        obeys "accept" (accepts one connection, reads its first bytes, says
        "accepted"), "close" (closes it, "closed"), "closelisten" ("closed"),
        "exit".

    owner_procs.py nsserver PORT
        Meant to run in a private network namespace (unshare -n): brings up
        lo, listens on 127.0.0.1:PORT, is named "tsns", says "ready PID".
        "listen PORT2" listens on PORT2 too ("listening"). "connect PORT"
        connects to its own listener on PORT, inside the namespace, accepts
        and exchanges a little data ("connected CLIENTPORT"); "close" closes
        the client, then the accepted socket ("closed"); "exit".

    owner_procs.py listen PORT NAME
        Named NAME: listens on 127.0.0.1:PORT, says "ready PID"; on "exit" or
        end of input closes it and exits.

    owner_procs.py reuse NAME CPU PORT...
        Named NAME, pinned to CPU. For each PORT, on "at T": binds a
        SO_REUSEPORT socket, says "bound PORT", calls listen() when
        CLOCK_MONOTONIC reaches T nanoseconds (two such processes given the
        same T listen at the same instant), says "listening PORT". Then it
        accepts every connection, reads it to end of file and closes it,
        until "exit".

    owner_procs.py threads PORT
        The main thread is named "tsmain"; a second thread named "tsworker"
        connects to 127.0.0.1:PORT, sends "ping" and says "connected LPORT".
        On "close" the worker closes the socket ("closed"); then "exit".
"""
import ctypes
import fcntl
import os
import select
import socket
import struct
import sys
import threading
import time

LIBC = ctypes.CDLL(None)


def set_name(name):
    """The calling thread's name (PR_SET_NAME)."""
    LIBC.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def expect(word):
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit("owner_procs: expected %r, got %r" % (word, line))


def close_when_told(sock, word="close"):
    """On WORD, close sock and say "closed"."""
    expect(word)
    sock.close()
    say("closed")


def listener(port, reuseport=False, listen=True):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    srv.bind(("127.0.0.1", port))
    if listen:
        srv.listen(64)
    return srv


def server(family, port, name, fork):
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    set_name(name)
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(4)
    say("ready %d" % os.getpid())
    conn, _ = srv.accept()
    conn.recv(16)
    conn.sendall(b"pong")
    if fork:
        child = os.fork()
        if child == 0:
            set_name(name + "-child"[: 15 - len(name)] if len(name) < 15 else name)
            srv.close()
            say("child %d" % os.getpid())
            close_when_told(conn)
            os._exit(0)
        conn.close()       # the child still holds it: no state change
        os.waitpid(child, 0)
    else:
        close_when_told(conn)
    close_when_told(srv, "closelisten")
    expect("exit")


def client(family, port, name):
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    set_name(name)
    cli = socket.socket(family, socket.SOCK_STREAM)
    cli.connect((host, port))
    say("connected %d" % cli.getsockname()[1])
    cli.sendall(b"ping")
    cli.recv(16)
    close_when_told(cli)
    expect("exit")


def forklisten(port):
    set_name("tsparent")
    srv = listener(port)
    say("ready %d" % os.getpid())
    expect("fork")
    if os.fork():
        os._exit(0)                 # the parent: gone, the listener lives on
    set_name("tschild")
    say("child %d" % os.getpid())
    expect("accept")
    conn, _ = srv.accept()
    conn.recv(16)
    say("accepted")
    close_when_told(conn)
    close_when_told(srv, "closelisten")
    expect("exit")


def loopback_up():
    """ip link set lo up, with two ioctls (SIOCGIFFLAGS, SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = bytearray(struct.pack("16sH22x", b"lo", 0))
        fcntl.ioctl(s.fileno(), 0x8913, ifreq)
        flags = struct.unpack_from("H", ifreq, 16)[0] | 1        # IFF_UP
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH22x", b"lo", flags))


def nsserver(port):
    loopback_up()
    set_name("tsns")
    listeners = {port: listener(port)}
    say("ready %d" % os.getpid())
    cli = acc = None
    for line in sys.stdin:
        words = line.split()
        if words[0] == "listen":
            listeners[int(words[1])] = listener(int(words[1]))
            say("listening")
        elif words[0] == "connect":
            cli = socket.create_connection(("127.0.0.1", int(words[1])), timeout=5)
            acc, _ = listeners[int(words[1])].accept()
            cli.sendall(b"ping")
            acc.recv(16)
            say("connected %d" % cli.getsockname()[1])
        elif words[0] == "close":
            cli.close()
            acc.recv(16)            # the client's FIN
            acc.close()
            say("closed")
        elif words[0] == "exit":
            break
    for srv in listeners.values():
        srv.close()


def listen_only(port, name):
    set_name(name)
    srv = listener(port)
    say("ready %d" % os.getpid())
    for line in sys.stdin:
        if line.strip() == "exit":
            break
    srv.close()


def reuse(name, cpu, ports):
    set_name(name)
    os.sched_setaffinity(0, {cpu})
    listeners = []
    for port in ports:
        # "at T": listen() at CLOCK_MONOTONIC nanosecond T, spinning for the
        # last 2 ms, so that two such processes on two CPUs call it within
        # well under a microsecond of each other (a blocking barrier would
        # wake the second one microseconds after the first).
        words = sys.stdin.readline().split()
        if words[:1] != ["at"]:
            raise SystemExit("owner_procs: expected 'at T', got %r" % words)
        at = int(words[1])
        srv = listener(port, reuseport=True, listen=False)
        say("bound %d" % port)
        left = at - time.monotonic_ns() - 2_000_000
        if left > 0:
            time.sleep(left / 1e9)
        clock = time.monotonic_ns
        while clock() < at:
            pass
        srv.listen(64)
        listeners.append(srv)
        say("listening %d" % port)
    for srv in listeners:
        srv.setblocking(False)
    conns = []
    while True:
        ready, _, _ = select.select(listeners + conns + [sys.stdin], [], [], 5)
        for s in ready:
            if s is sys.stdin:
                if sys.stdin.readline().strip() in ("exit", ""):
                    for c in listeners + conns:
                        c.close()
                    return
            elif s in listeners:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                conns.append(conn)
            else:
                if not s.recv(64):
                    conns.remove(s)
                    s.close()


def threads(port):
    set_name("tsmain")
    done = threading.Event()
    result = {}

    def work():
        set_name("tsworker")
        cli = socket.create_connection(("127.0.0.1", port), timeout=5)
        cli.sendall(b"ping")
        result["port"] = cli.getsockname()[1]
        result["ready"] = True
        done.wait(30)
        cli.close()

    worker = threading.Thread(target=work)
    worker.start()
    while "ready" not in result and worker.is_alive():
        worker.join(0.01)
    say("connected %d" % result["port"])
    expect("close")
    done.set()
    worker.join()
    say("closed")
    expect("exit")


def main():
    role, args = sys.argv[1], sys.argv[2:]
    if role in ("server", "client"):
        family = socket.AF_INET6 if args[0] == "6" else socket.AF_INET
        if role == "server":
            server(family, int(args[1]), args[2], args[3:4] == ["fork"])
        else:
            client(family, int(args[1]), args[2])
    elif role == "forklisten":
        forklisten(int(args[0]))
    elif role == "nsserver":
        nsserver(int(args[0]))
    elif role == "listen":
        listen_only(int(args[0]), args[1])
    elif role == "reuse":
        reuse(args[0], int(args[1]), [int(p) for p in args[2:]])
    elif role == "threads":
        threads(int(args[0]))
    else:
        raise SystemExit("owner_procs: unknown role %r" % role)


if __name__ == "__main__":
    main()
