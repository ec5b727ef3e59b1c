"""A slow reader of a pipe, for the stop-signal tests.

    slow_reader.py OUTFILE [CHUNK [PAUSE]]

Reads stdin CHUNK bytes at a time (default 4096), sleeping PAUSE seconds
(default 0.004) after each read, so about 1 MB/s, and writes every byte it
gets to OUTFILE unchanged (unbuffered) until end of file.
"""
import os
import sys
import time


def main():
    out = sys.argv[1]
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.004
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            data = os.read(0, chunk)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            time.sleep(pause)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
