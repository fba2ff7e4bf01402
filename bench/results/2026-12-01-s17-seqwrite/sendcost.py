"""``python sendcost.py MODE [N]``: the sender's CPU per MiB over TCP loopback, by how
the receiver takes N 1 MiB "WRITEs" (a 28-byte header, then the payload) off the socket.

A sender process sends them at queue depth 8 (a byte back per WRITE done); the receiver
writes each payload into a 1 GiB file (pages dropped first) and answers. MODE:

- serial: receive as it comes, then pwrite, one thread (tapnbd with TAPNBD_SPLICE=0);
- thread: a reader thread receives as it comes, a writer thread pwrites (nbdkit's way);
- splice: socket -> pipe as it comes, then pipe -> file, one thread;
- splicechunk: what has come goes socket -> pipe -> file at once, repeated;
- splicethread: a reader splices socket -> pipe, a writer pipe -> file.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import queue
import resource
import socket
import sys
import threading
import time

MiB = 1 << 20
HDR = 28
F_SETPIPE_SZ = 1031
IMAGE = "/var/tmp/rw/s17/sendcost.img"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sender(port: int, n: int, out: mp.Queue[tuple[float, float]]) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = os.urandom(MiB + HDR)
    inflight = 0
    c0, t0 = cpu_seconds(), time.monotonic()
    for _ in range(n):
        s.sendall(buf)
        inflight += 1
        while inflight >= 8:
            inflight -= len(s.recv(64))
    while inflight > 0:
        inflight -= len(s.recv(64))
    out.put(((cpu_seconds() - c0) * 1e6 / n, n / (time.monotonic() - t0)))


def new_pipe() -> tuple[int, int]:
    rp, wp = os.pipe()
    fcntl.fcntl(wp, F_SETPIPE_SZ, MiB)
    return rp, wp


class Receiver:
    def __init__(self, conn: socket.socket, fd: int, n: int) -> None:
        self.c, self.fd, self.n = conn, fd, n

    def recv_all(self, v: memoryview) -> None:
        got = 0
        while got < len(v):
            k = self.c.recv_into(v[got:])
            if not k:
                raise EOFError
            got += k

    def to_file(self, rp: int, length: int, offset: int) -> None:
        done = 0
        while done < length:
            done += os.splice(rp, self.fd, length - done, offset_dst=offset + done)

    def from_socket(self, wp: int, length: int) -> None:
        got = 0
        while got < length:
            got += os.splice(self.c.fileno(), wp, length - got)

    def serial(self) -> None:
        view = memoryview(bytearray(MiB + HDR))
        for i in range(self.n):
            self.recv_all(view)
            os.pwrite(self.fd, view[HDR:], (i % 1024) * MiB)
            self.c.send(b"x")

    def thread(self) -> None:
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        full: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(4):
            free.put(bytearray(MiB + HDR))

        def writer() -> None:
            for i in range(self.n):
                b = full.get()
                os.pwrite(self.fd, memoryview(b)[HDR:], (i % 1024) * MiB)
                self.c.send(b"x")
                free.put(b)

        w = threading.Thread(target=writer)
        w.start()
        for _ in range(self.n):
            b = free.get()
            self.recv_all(memoryview(b))
            full.put(b)
        w.join()

    def splice(self) -> None:
        rp, wp = new_pipe()
        head = memoryview(bytearray(HDR))
        for i in range(self.n):
            self.recv_all(head)
            self.from_socket(wp, MiB)
            self.to_file(rp, MiB, (i % 1024) * MiB)
            self.c.send(b"x")

    def splicechunk(self) -> None:
        rp, wp = new_pipe()
        head = memoryview(bytearray(HDR))
        for i in range(self.n):
            self.recv_all(head)
            got = 0
            while got < MiB:
                k = os.splice(self.c.fileno(), wp, MiB - got)
                self.to_file(rp, k, (i % 1024) * MiB + got)
                got += k
            self.c.send(b"x")

    def splicethread(self) -> None:
        free: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        full: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        for _ in range(4):
            free.put(new_pipe())

        def writer() -> None:
            for i in range(self.n):
                p = full.get()
                self.to_file(p[0], MiB, (i % 1024) * MiB)
                self.c.send(b"x")
                free.put(p)

        w = threading.Thread(target=writer)
        w.start()
        head = memoryview(bytearray(HDR))
        for _ in range(self.n):
            p = free.get()
            self.recv_all(head)
            self.from_socket(p[1], MiB)
            full.put(p)
        w.join()


def main() -> None:
    mode, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    results: mp.Queue[tuple[float, float]] = mp.Queue()
    p = mp.Process(target=sender, args=(ls.getsockname()[1], n, results))
    p.start()
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = os.open(IMAGE, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 30)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    c0 = cpu_seconds()
    getattr(Receiver(conn, fd, n), mode)()
    mine = (cpu_seconds() - c0) * 1e6 / n
    theirs, rate = results.get()
    p.join()
    print(f"{mode:7s} sender {theirs:6.0f} us/MiB  receiver {mine:6.0f} us/MiB  {rate:6.0f} MiB/s")


if __name__ == "__main__":
    main()
