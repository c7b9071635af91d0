"""The HTTP layer of the reward server (:mod:`flowrl.rewards.server`): connection threads bounded by
``max_connections`` over a listen backlog, a whole-request deadline on every read, a bounded drain of a
refused body, and ``Connection: close`` after every answer other than 200.

``HTTPServer(address, app)`` serves ``app``, which provides ``limits``, ``token``, ``info()``,
``parse(body, binary)``, ``run(samples, prompts, meta)``, ``admit()`` and ``release()``.
"""
from __future__ import annotations

import hmac
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from .deadline import WorkerError
from .wire import RequestError

JSON_TYPE = "application/json"
BINARY_TYPE = "application/x-flowrl-npy"  # [8-byte big-endian n][n bytes JSON {prompts, meta}][.npy samples]
LISTEN_BACKLOG = 1024
DRAIN_BYTES = 16 * 2**20  # a refused body up to this size is read and dropped, so the client sees the answer, not a reset


class HTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections``; the rest wait in the listen backlog."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(self, address: tuple, app: Any):
        self.app = app
        self._slots = threading.Semaphore(app.limits.max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        while not self._slots.acquire(timeout=0.2):  # full: stop accepting; the backlog holds the next ones
            if getattr(self, "_BaseServer__shutdown_request", False):
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # a client that vanished: nothing to report
        pass


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose every read gets the time left until the request's deadline:
    ``idle_s`` for the first byte of a request, then ``request_s`` from that byte for all the rest."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.idle_s = self.request_s = 1.0
        self.deadline: Optional[float] = None

    def readable(self) -> bool:
        return True

    def arm(self, idle_s: float, request_s: float) -> None:
        self.idle_s, self.request_s, self.deadline = idle_s, request_s, None

    def readinto(self, b) -> int:
        if self.deadline is None:
            timeout = self.idle_s
        else:
            timeout = self.deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"request not received within request_timeout_s={self.request_s:g} s")
        self.sock.settimeout(timeout)
        n = self.sock.recv_into(b)
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.request_s
        return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "flowrl-reward/2"
    server: HTTPServer

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)

    def handle_one_request(self) -> None:
        lim = self.server.app.limits
        self._reader.arm(lim.idle_timeout_s, lim.request_timeout_s)
        super().handle_one_request()

    def log_message(self, fmt, *args):  # quiet; errors go back to the client
        pass

    def _send(self, status: int, obj: dict, retry_after: int = 0) -> None:
        self.connection.settimeout(self.server.app.limits.request_timeout_s)  # a client that never reads
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))
        if retry_after:
            self.send_header("Retry-After", str(retry_after))
        if status != 200:  # the body may be unread or partly read: never parse it as the next request
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        token = self.server.app.token
        if token is None:
            return True
        got = self.headers.get("Authorization", "").split(None, 1)
        cred = got[1].strip() if len(got) == 2 and got[0].lower() == "bearer" else ""
        return hmac.compare_digest(cred.encode("utf-8", "replace"), token.encode("utf-8"))

    def _drain(self) -> None:
        """Read and drop a refused request's unread body (at most DRAIN_BYTES, within its deadline), so the
        client reads the answer instead of a reset; the connection closes after the answer anyway."""
        left, self._unread = self._unread, 0
        if not 0 < left <= DRAIN_BYTES:
            return
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:  # the deadline passed or the client left: close without more
            pass

    def _guard(self, fn) -> None:
        try:
            self._unread = self._content_length() or 0
        except RequestError:
            self._unread = 0
        try:
            if not self._authorised():
                raise RequestError(401, "missing or wrong bearer token")
            fn()
        except RequestError as e:
            self._drain()
            self._send(e.status, {"error": str(e)}, e.retry_after)
        except TimeoutError as e:  # the request did not arrive in time
            self._send(408, {"error": str(e)})
        except WorkerError as e:
            self._send(500, {"error": f"reward failed: {e}"})
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as e:  # a server fault: the server keeps serving
            self._send(500, {"error": f"reward failed: {type(e).__name__}: {e}"})

    def _content_length(self) -> Optional[int]:
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "Transfer-Encoding is not accepted; send a Content-Length")
        vals = self.headers.get_all("Content-Length") or []
        if not vals:
            return None
        if len(vals) != 1 or not vals[0].strip().isascii() or not vals[0].strip().isdigit():
            raise RequestError(400, f"bad Content-Length {vals!r}: one decimal number expected")
        return int(vals[0].strip())

    def do_GET(self) -> None:
        def go():
            if self._content_length() not in (None, 0):
                raise RequestError(400, "a GET has no body")
            if self.path.rstrip("/") != "/health":
                raise RequestError(404 if self.path.rstrip("/") != "/score" else 405,
                                   f"no GET {self.path}; use GET /health or POST /score")
            self._send(200, self.server.app.info())

        self._guard(go)

    def do_POST(self) -> None:
        app = self.server.app

        def go():
            if self.path.rstrip("/") != "/score":
                raise RequestError(404, f"no POST {self.path}; use POST /score")
            n = self._content_length()
            if n is None:
                raise RequestError(411, "Content-Length is required")
            if n > app.limits.max_body_bytes:
                raise RequestError(413, f"body of {n} bytes > limit max_body_bytes={app.limits.max_body_bytes}")
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype not in (JSON_TYPE, BINARY_TYPE):
                raise RequestError(415, f"Content-Type {ctype!r}; use {JSON_TYPE} or {BINARY_TYPE}")
            body = self.rfile.read(n)  # every read under the request's deadline
            self._unread = 0
            if len(body) != n:
                raise RequestError(400, f"body of {len(body)} bytes, shorter than its Content-Length {n}")
            if not app.admit():
                raise RequestError(503, f"busy: {app.limits.max_pending} requests already pending; retry later",
                                   retry_after=1)
            try:
                samples, prompts, meta = app.parse(body, binary=ctype == BINARY_TYPE)
                del body
                self._send(200, app.run(samples, prompts, meta))
            finally:
                app.release()

        self._guard(go)

    def _no(self) -> None:
        def go():
            raise RequestError(405, f"method {self.command} not allowed; use GET /health or POST /score")

        self._guard(go)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _no
