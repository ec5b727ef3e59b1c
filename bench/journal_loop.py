#!/usr/bin/python3
"""The ceiling of bench.py's -Y ladder: a bare python-systemd sendv loop
sending records of tcpstates' 21 journal fields (those of a socket whose
owner runs: OBJECT_PID is this loop) as fast as journald takes them, for
SECONDS seconds. Prints {"sent": N, "seconds": S}.

    journal_loop.py SECONDS same|distinct IDENTIFIER

same      one record, sent again and again (journald stores each value
          once, and links it: cheaper for it than real traffic)
distinct  every record with its own ports, socket, times and span, as
          real events have (a little Python work per record, which
          journald's pace leaves room for)
"""
import json
import os
import sys
import time

from systemd import journal

ARROW = "\u2192"


def fields(n, identifier, pid=os.getpid()):
    lport, rport = 20000 + n % 40000, 40000 - n % 20000
    return [
        "MESSAGE=python3[%d]: 127.0.0.1:%d %s 127.0.0.1:%d ESTABLISHED %s FIN_WAIT1 "
        "after %.3f ms" % (pid, lport, ARROW, rport, ARROW, n / 7),
        "MESSAGE_ID=29e4d369fcd3401e89a1bc2b4ff01360", "PRIORITY=5",
        "SYSLOG_IDENTIFIER=" + identifier, "OBJECT_PID=%d" % pid,
        "TCPSTATES_OWNER_PID=%d" % pid, "TCPSTATES_OWNER_COMM=python3",
        "TCPSTATES_OWNER_FROM=self",
        "OBJECT_IPV4_SOURCE_ADDRESS=127.0.0.1", "OBJECT_TCP_SOURCE_PORT=%d" % lport,
        "OBJECT_IPV4_DESTINATION_ADDRESS=127.0.0.1", "OBJECT_TCP_DESTINATION_PORT=%d" % rport,
        "OBJECT_TCP_OLD_STATE=ESTABLISHED", "OBJECT_TCP_NEW_STATE=FIN_WAIT1",
        "OBJECT_TCP_SPAN_TIME=%d" % (n * 1000 // 7),
        "TCPSTATES_SOCKET=%x" % (0xffff888102ed0000 + n * 2048), "TCPSTATES_IP_VERSION=4",
        "TCPSTATES_EVENT_REALTIME_USEC=%d" % (1_700_000_000_000_000 + n * 25),
        "TCPSTATES_EVENT_MONOTONIC_USEC=%d" % (5_000_000 + n * 25),
        "TCPSTATES_ONCPU_PID=4242", "TCPSTATES_ONCPU_COMM=loadgen",
    ]


def main():
    seconds, mode, identifier = float(sys.argv[1]), sys.argv[2], sys.argv[3]
    send = journal.sendv
    same = fields(0, identifier)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for n in range(sent, sent + 100):
            send(*(same if mode == "same" else fields(n, identifier)))
        sent += 100
    print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - start, 3)}))


if __name__ == "__main__":
    main()
