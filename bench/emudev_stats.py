#!/usr/bin/env python3
"""Print emudevd's counters as one line: requests kicks interrupts iterations sleeps
poller_cpu_ns.

usage: emudev_stats.py CONTROL_SOCKET   (emudevd --control; prints "- - - - - -" on failure)
Sums every queue of every device and every poller thread (`query-stats`).
"""
import json
import socket
import sys


def main():
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(sys.argv[1])
        f = s.makefile("rwb")
        f.readline()  # greeting
        f.write(b'{"execute":"query-stats"}\n')
        f.flush()
        r = json.loads(f.readline())["return"]
        q = [q for d in r["devices"] for q in d["queues"]]
        p = r["pollers"]
        vals = [
            sum(x["requests"] for x in q),
            sum(x["kicks"] for x in q),
            sum(x["interrupts"] for x in q),
            sum(x["iterations"] for x in p),
            sum(x["sleeps"] for x in p),
            sum(x.get("cpu_ns") or 0 for x in p),
        ]
        print(" ".join(str(v) for v in vals))
    except (OSError, ValueError, KeyError, TypeError):
        print("- - - - - -")


if __name__ == "__main__":
    main()
