"""A fault-injecting HTTP proxy in front of the moto server, for S3 faults against real parts.

moto has no general fault injection (its ``/moto-api/`` offers reset, seeding, state transitions
and a recorder, nothing that fails or slows a request), so every platform process — CLI, daemon,
webserver, run workers — is pointed at this proxy instead of moto. It forwards each request to
moto unchanged, unless a rule the test installed matches the request (method and a regular
expression on the unquoted path and query), in which case it can:

- ``error``: answer an S3 error (e.g. 503 SlowDown, 500 InternalError, 403 AccessDenied) without
  forwarding;
- ``reset``: reset the connection without forwarding (the request never reached S3);
- ``lost``: forward, then reset the connection (the write happened, its answer never came back);
- ``cut``: forward, answer the status, the headers and half the body, then reset the connection
  (a read whose connection broke in the middle of the body);
- ``delay``: wait, then forward (slowness);
- ``hold``: park the request until the test releases it — forwarded, or dropped with a reset —
  so that the test can act (kill the worker that sent it) while a step is in a known place.

A rule hits ``times`` matching requests (``None``: until removed) after letting ``skip`` through.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import unquote, urlsplit

from publish_platform.local_s3 import free_port

Action = Literal["error", "reset", "lost", "cut", "delay", "hold"]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


@dataclass
class Fault:
    """One rule of the proxy; the counters say what it did."""

    pattern: str
    action: Action
    method: str | None = None
    status: int = 503
    code: str = "SlowDown"
    seconds: float = 0.0
    times: int | None = 1
    skip: int = 0
    seen: int = 0  # matching requests so far
    hits: int = 0  # requests this rule acted on
    hit: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)
    _forward: bool = True

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and bool(
            re.search(self.pattern, target)
        )

    def release(self, forward: bool = True) -> None:
        """Let held requests go: forwarded to S3, or dropped with a connection reset."""
        self._forward = forward
        self._released.set()

    def wait_hit(self, timeout: float) -> None:
        if not self.hit.wait(timeout):
            raise TimeoutError(f"no request matched {self.method or '*'} {self.pattern!r}")


@dataclass
class Request:
    method: str
    target: str
    outcome: str  # the action taken, or the status moto answered


class FaultProxy:
    """The proxy on 127.0.0.1; ``url`` is the S3 endpoint the platform uses."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for fault in self.faults:
            fault.release(forward=False)
        self._server.shutdown()
        self._server.server_close()

    def add(self, pattern: str, action: Action, method: str | None = None, **options) -> Fault:
        fault = Fault(pattern, action, method, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self.faults:
                self.faults.remove(fault)
        fault.release()

    def clear(self) -> None:
        for fault in list(self.faults):
            self.remove(fault)

    def seen(self, pattern: str, method: str | None = None) -> list[Request]:
        """Requests that went through the proxy so far, matching a pattern."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and re.search(pattern, r.target)
            ]

    def _pick(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if not fault.matches(method, target):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                fault.hits += 1
                return fault
        return None

    def _record(self, method: str, target: str, outcome: str) -> None:
        with self._lock:
            self.requests.append(Request(method, target, outcome))


def _error_body(code: str, target: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the test's fault proxy</Message>"
        f"<Resource>{target}</Resource><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects

        def log_message(self, *args: object) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reset(self) -> None:
            """Close with RST: the client sees its connection reset by peer."""
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            self.close_connection = True

        def finish(self) -> None:
            with contextlib.suppress(OSError, ValueError):
                super().finish()

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if "Content-Length" in self.headers or body:
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                return response.status, response.getheaders(), data
            finally:
                upstream.close()

        def _answer(
            self, status: int, headers: list[tuple[str, str]], data: bytes, cut: bool = False
        ) -> None:
            """Answer as S3 did; ``cut``: only the first half of the body is sent."""
            head = self.command == "HEAD"  # keeps the object's Content-Length, sends no body
            self.send_response(status)
            for name, value in headers:
                lowered = name.lower()
                if lowered in HOP_BY_HOP or (lowered == "content-length" and not head):
                    continue
                self.send_header(name, value)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data[: len(data) // 2] if cut else data)

        def _handle(self) -> None:
            target = unquote(self.path)
            body = self._body()
            fault = proxy._pick(self.command, target)
            action = fault.action if fault else "forward"
            if fault is not None:
                fault.hit.set()
            if fault is not None and action == "error":
                proxy._record(self.command, target, f"error {fault.status} {fault.code}")
                data = _error_body(fault.code, target)
                self._answer(fault.status, [("Content-Type", "application/xml")], data)
                return
            if action == "reset":
                proxy._record(self.command, target, "reset")
                self._reset()
                return
            if fault is not None and action == "delay":
                time.sleep(fault.seconds)
            if fault is not None and action == "hold":
                fault._released.wait(600)
                if not fault._forward:
                    proxy._record(self.command, target, "held, dropped")
                    self._reset()
                    return
            try:
                status, headers, data = self._forward(body)
            except OSError as exc:
                proxy._record(self.command, target, f"upstream error {exc}")
                self._reset()
                return
            if action == "lost":
                proxy._record(self.command, target, f"lost {status}")
                self._reset()
                return
            if action == "cut":
                proxy._record(self.command, target, f"cut {status}")
                self._answer(status, headers, data, cut=True)
                self._reset()
                return
            proxy._record(self.command, target, f"{action} {status}")
            self._answer(status, headers, data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

    return Handler


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as proxy:
        yield proxy
