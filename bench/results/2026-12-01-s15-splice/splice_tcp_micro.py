"""Receiver CPU per MiB: recv_into+pwrite vs splice(sock->pipe->file), TCP loopback, sender in another process."""
import os, socket, sys, time, fcntl, resource, multiprocessing as mp
MiB = 1 << 20
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
mode = sys.argv[1]
F_SETPIPE_SZ = 1031

def sender(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = os.urandom(MiB)
    for i in range(N):
        s.sendall(buf)
        if i % 8 == 7: s.recv(1)  # QD8-ish: wait for an ack every 8 MiB
    s.close()

ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
p = mp.Process(target=sender, args=(ls.getsockname()[1],)); p.start()
c, _ = ls.accept()
fd = os.open("/var/tmp/splice.img", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 1 << 30)
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.monotonic()
if mode == "waitall":
    buf = bytearray(MiB)
    for i in range(N):
        assert c.recv_into(buf, MiB, socket.MSG_WAITALL) == MiB
        os.pwrite(fd, buf, (i % 1024) * MiB)
        if i % 8 == 7: c.send(b"x")
elif mode == "copy":
    buf = bytearray(MiB); view = memoryview(buf)
    for i in range(N):
        got = 0
        while got < MiB:
            got += c.recv_into(view[got:])
        os.pwrite(fd, buf, (i % 1024) * MiB)
        if i % 8 == 7: c.send(b"x")
else:
    rp, wp = os.pipe(); fcntl.fcntl(wp, F_SETPIPE_SZ, MiB)
    sfd = c.fileno()
    for i in range(N):
        off = (i % 1024) * MiB
        left = MiB
        while left:
            n = os.splice(sfd, wp, left, flags=os.SPLICE_F_MOVE)
            m = 0
            while m < n:
                m += os.splice(rp, fd, n - m, offset_dst=off, flags=os.SPLICE_F_MOVE)
            off += n; left -= n
        if i % 8 == 7: c.send(b"x")
t1 = time.monotonic(); r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
p.join()
print(f"{mode}: {N/(t1-t0):.0f} MiB/s, receiver {cpu*1e6/N:.0f} us/MiB")
