#!/usr/bin/env python3
"""Test-only TCP proxy that drops connections: every Nth accepted connection is closed at
once, without a byte exchanged. The rest are relayed to the target port untouched.

usage: flaky_proxy.py TARGET_PORT N
Listens on a free loopback port and prints it on stdout once listening.
"""
import socket
import sys
import threading

target_port, every = (int(a) for a in sys.argv[1:3])


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


server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0))
server.listen(128)
print(server.getsockname()[1], flush=True)
count = 0
while True:
    client, _ = server.accept()
    count += 1
    if count % every == 0:
        client.close()
        continue
    upstream = socket.create_connection(("127.0.0.1", target_port))
    threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
