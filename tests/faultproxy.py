"""A loopback HTTP proxy in front of the S3 test server that injects real faults: 503 bursts and slow answers.

moto's server mode has no fault injection of its own, so this proxy sits between s3fs/botocore and moto and
answers some requests itself (503 SlowDown, the throttling reply S3 sends) or forwards them late. Every
forwarded and every injected request is counted, so a test can prove that retries happened and that no
write was applied twice.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """``with FaultProxy(upstream) as p:`` then point S3 clients at ``p.url``.

    ``fail_every``: every n-th request (per method in ``methods``) gets ``burst`` consecutive 503s first.
    ``delay_s``/``delay_every``: every n-th request is forwarded after ``delay_s`` seconds.
    """

    def __init__(self, upstream: str, *, fail_every: int = 3, burst: int = 2, methods=("PUT", "GET", "HEAD"),
                 delay_s: float = 0.0, delay_every: int = 0):
        self.upstream = urlsplit(upstream)
        self.fail_every, self.burst, self.methods = fail_every, burst, set(methods)
        self.delay_s, self.delay_every = delay_s, delay_every
        self.lock = threading.Lock()
        self.seen = 0
        self.injected = 0
        self.delayed = 0
        self.forwarded: list[tuple[str, str]] = []
        self._pending_failures: dict[tuple[str, str], int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = proxy._decide(self.command, self.path)
                if action == "fail":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                if action == "delay":
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with proxy.lock:
                    proxy.forwarded.append((self.command, self.path))
                self.send_response(resp.status)
                head = self.command == "HEAD"          # a HEAD answer keeps the object's Content-Length
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str) -> str:
        with self.lock:
            key = (method, path)
            if self._pending_failures.get(key, 0) > 0:
                self._pending_failures[key] -= 1
                self.injected += 1
                return "fail"
            if method in self.methods:
                self.seen += 1
                if self.fail_every and self.seen % self.fail_every == 0 and self.burst > 0:
                    self._pending_failures[key] = self.burst - 1
                    self.injected += 1
                    return "fail"
                if self.delay_every and self.seen % self.delay_every == 0:
                    self.delayed += 1
                    return "delay"
            return "forward"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
