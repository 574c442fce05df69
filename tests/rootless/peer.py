"""Run inside a rootless `graft run`: a server grafted onto ep-in (api: by name; the others: a bind of
0.0.0.0:8080 that --ingress grafts), answers one request, then a client leaving by ep-out to the
test's host server, and a connect to a destination no rule names (stays in the container: refused).
Prints what it saw, one line each."""
import os
import socket
import sys

mode, out_port = sys.argv[1], int(sys.argv[2])
print("ids", os.getuid(), os.getgid(), open("/proc/self/uid_map").read().split(), flush=True)
if mode == "api":
    import sockgraft

    s = sockgraft.socket(sockgraft.AF_GRAFT, sockgraft.SOCK_STREAM)
    s.bind("ep-in")
else:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080))
s.listen()
print("ready", flush=True)
c, _ = s.accept()
c.sendall(b"pong:" + c.recv(100))
c.close()
s.close()
if mode == "api":
    o = sockgraft.create_connection(("127.0.0.1", out_port), source="ep-out")
else:
    o = socket.create_connection(("127.0.0.1", out_port), timeout=10)
o.sendall(b"hello")
print("egress", o.recv(100).decode(), "mark", o.getsockopt(socket.SOL_SOCKET, socket.SO_MARK), flush=True)
o.close()
try:
    socket.create_connection(("127.0.0.3", out_port), timeout=5).close()
    print("unlisted connected", flush=True)
except OSError as e:
    print("unlisted refused", e.errno, flush=True)
