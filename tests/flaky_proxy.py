#!/usr/bin/env python3
"""Test-only TCP proxy that misbehaves on every Nth accepted connection; the rest are relayed
to the target port untouched.

usage: flaky_proxy.py TARGET_PORT N [drop|5xx] [COUNT_FILE]
  drop  (default) close the connection at once, without a byte exchanged;
  5xx   read the first request's head, answer it with an S3-style 500 InternalError or
        503 SlowDown (alternately), and close;
  cut=B relay, but close the connection once B bytes of answers went back (a body cut
        part-way, as a dropped link or a client timeout leaves it); counted when it cuts.
Each injected fault appends a line to COUNT_FILE when given. Listens on a free loopback port
and prints it on stdout once listening.
"""
import socket
import sys
import threading

target_port, every = (int(a) for a in sys.argv[1:3])
mode = sys.argv[3] if len(sys.argv) > 3 else "drop"
count_file = sys.argv[4] if len(sys.argv) > 4 else None
lock = threading.Lock()
faults = 0


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def pipe_cut(src, dst, limit):
    sent = 0
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if sent + len(data) > limit:
                dst.sendall(data[: limit - sent])
                fault()
                break
            sent += len(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def answer_5xx(client, n):
    try:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = client.recv(65536)
            if not data:
                break
            head += data
        status, code = ((500, "InternalError") if n % 2 else (503, "SlowDown"))
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by flaky_proxy.py</Message></Error>").encode()
        reason = "Internal Server Error" if status == 500 else "Slow Down"
        client.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    except OSError:
        pass
    finally:
        client.close()


def fault():
    global faults
    with lock:
        faults += 1
        if count_file:
            with open(count_file, "a") as f:
                f.write(f"{mode}\n")
        return faults


server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0))
server.listen(128)
print(server.getsockname()[1], flush=True)
count = 0
while True:
    client, _ = server.accept()
    count += 1
    if count % every == 0 and mode.startswith("cut="):
        upstream = socket.create_connection(("127.0.0.1", target_port))
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pipe_cut, args=(upstream, client, int(mode[4:])),
                         daemon=True).start()
        continue
    if count % every == 0:
        n = fault()
        if mode == "5xx":
            threading.Thread(target=answer_5xx, args=(client, n), daemon=True).start()
        else:
            client.close()
        continue
    upstream = socket.create_connection(("127.0.0.1", target_port))
    threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
