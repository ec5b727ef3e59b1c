"""A TCP peer for the owner tests, run as its own process with its own name.

    peer.py server FAMILY PORT NAME [fork]   listen, accept one connection
    peer.py client FAMILY PORT NAME          connect, exchange a little data

It reports on stdout ("ready PID", "connected LPORT", "child PID") and acts
on lines read from stdin: "close" closes the connection, "closelisten" closes
the listener (server), "exit" ends it. With "fork" the server hands the
accepted socket to a forked child named NAME-child, closes its own copy, and
the child obeys the next "close".
"""
import ctypes
import os
import socket
import sys


def set_name(name):
    libc = ctypes.CDLL(None)
    libc.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)   # PR_SET_NAME


def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def expect(word):
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit("peer: expected %r, got %r" % (word, line))


def main():
    role, family, port, name = sys.argv[1:5]
    fork = sys.argv[5:6] == ["fork"]
    family = socket.AF_INET6 if family == "6" else socket.AF_INET
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    set_name(name)
    if role == "server":
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, int(port)))
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
                expect("close")
                conn.close()
                say("closed")
                os._exit(0)
            conn.close()       # the child still holds it: no state change
            os.waitpid(child, 0)
        else:
            expect("close")
            conn.close()
            say("closed")
        expect("closelisten")
        srv.close()
        say("closed")
    else:
        cli = socket.socket(family, socket.SOCK_STREAM)
        cli.connect((host, int(port)))
        say("connected %d" % cli.getsockname()[1])
        cli.sendall(b"ping")
        cli.recv(16)
        expect("close")
        cli.close()
        say("closed")
    expect("exit")


if __name__ == "__main__":
    main()
