#!/usr/bin/python3
"""Writes to an NBD URI through libnbd for SECONDS at a queue depth: sequential or random,
BS bytes per request. Prints "iops MiBps client-cpu-seconds" like bench/lib.sh's fio_run.

    bench/nbd-write.py URI randwrite|write BS QD SECONDS

Unlike fio's nbd engine it lets libnbd read local files named in the URI, so
`nbds://HOST:PORT/EXPORT?tls-certificates=DIR` presents DIR's client certificate."""
import os
import random
import sys
import time

import nbd

uri, rw, bs, qd, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
bs = int(bs[:-1]) * {"k": 1024, "M": 1 << 20}[bs[-1]] if bs[-1] in "kM" else int(bs)
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
size = h.get_size()
blocks = size // bs
buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(bs)))
rng = random.Random(1)
pos = 0
done = 0


def next_offset():
    global pos
    if rw == "randwrite":
        return rng.randrange(blocks) * bs
    pos = (pos + 1) % blocks
    return pos * bs


def completed(*_):
    global done
    done += 1
    return 1


cpu0, t0 = time.process_time(), time.monotonic()
end = t0 + secs
while time.monotonic() < end:
    while h.aio_in_flight() < qd:
        h.aio_pwrite(buf, next_offset(), completion=completed)
    h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
elapsed = time.monotonic() - t0
h.shutdown()
print(done / elapsed, done * bs / elapsed / 2**20, time.process_time() - cpu0)
