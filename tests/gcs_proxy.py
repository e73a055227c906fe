#!/usr/bin/env python3
"""Test-only proxy: lets object_store's GCS client write to an S3 server.

No GCS emulator installable here accepts object_store's XML-API writes, but the GCS XML API
is S3's protocol with x-goog-* headers. This proxy forwards every request to an S3 server
(an unauthenticated s3s-fs), renaming the GCS headers to their S3 equivalents:
x-goog-copy-source -> x-amz-copy-source, x-goog-if-generation-match: 0 -> If-None-Match: *,
x-goog-meta-* -> x-amz-meta-*. It is not a GCS emulator: list (the JSON API) is not mapped;
the tests read GCS objects back from fake-gcs-server instead.

usage: gcs_proxy.py LISTEN_PORT S3_PORT
"""
import http.client
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_PORT = int(sys.argv[2])
DROP = {"host", "authorization", "connection", "content-length", "transfer-encoding",
        "accept-encoding"}


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {}
        for name, value in self.headers.items():
            low = name.lower()
            if low in DROP:
                continue
            if low == "x-goog-copy-source":
                headers["x-amz-copy-source"] = value
            elif low == "x-goog-if-generation-match":
                if value.strip() == "0":
                    headers["If-None-Match"] = "*"
            elif low.startswith("x-goog-meta-"):
                headers["x-amz-meta-" + name[len("x-goog-meta-"):]] = value
            elif low.startswith("x-goog-"):
                continue
            else:
                headers[name] = value
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", S3_PORT, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() in ("content-length", "transfer-encoding", "connection"):
                continue
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Proxy).serve_forever()
