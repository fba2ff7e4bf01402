"""Server CPU per MiB: recv_into+pwrite against splice(socket->pipe->file)."""
import os, socket, sys, threading, time, resource, fcntl
MiB = 1 << 20
N = 3000
mode = sys.argv[1]
path = "/var/tmp/splice.img"
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 1024 * MiB)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()
port = ls.getsockname()[1]
def client() -> None:
    c = socket.create_connection(("127.0.0.1", port))
    buf = os.urandom(MiB)
    for _ in range(N):
        c.sendall(buf)
    c.close()
t = threading.Thread(target=client); t.start()
s, _ = ls.accept()
sfd = s.fileno()
r0 = resource.getrusage(resource.RUSAGE_THREAD); w0 = time.monotonic()
off = 0
if mode == "copy":
    buf = bytearray(MiB); view = memoryview(buf)
    for i in range(N):
        got = 0
        while got < MiB:
            got += s.recv_into(view[got:])
        os.pwrite(fd, buf, (i % 1024) * MiB)
else:
    pr, pw = os.pipe()
    fcntl.fcntl(pw, 1031, MiB)  # F_SETPIPE_SZ
    for i in range(N):
        got = 0
        while got < MiB:
            got += os.splice(sfd, pw, MiB - got)
        pos = (i % 1024) * MiB
        done = 0
        while done < MiB:
            done += os.splice(pr, fd, MiB - done, offset_dst=pos + done)
r1 = resource.getrusage(resource.RUSAGE_THREAD); w1 = time.monotonic()
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(mode, f"server thread cpu {cpu*1e6/N:.0f} us/MiB, wall {(w1-w0)*1e6/N:.0f} us/MiB")
t.join()
