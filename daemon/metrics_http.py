"""``metrics_listen``: GET /metrics over HTTP, on the daemon's own event loop.

A deliberately tiny HTTP/1.x server (asyncio.start_server): one request per
connection, then the connection is closed. It must never hold up a heartbeat, so
everything is bounded: the request head (``MAX_HEAD`` bytes, ``MAX_LINES`` lines),
the time a client may take to send it and to read the answer (``TIMEOUT`` for the
whole exchange), and the clients served at once (``MAX_CLIENTS``; more are closed at
once). The body is rendered synchronously from one snapshot (metrics.py): that
costs well under a millisecond at 3 nodes (README, Metrics). ``GET`` and ``HEAD`` of
``/metrics`` (any query string) answer 200; other paths 404, other methods 405, a
malformed head 400.

The address is a loopback one (config.py refuses others): the endpoint has neither
TLS nor authentication, and it names every node and address of the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lbd.daemon import control
from lbd.daemon.config import metrics_address
from lbd.daemon.metrics import CONTENT_TYPE
from lbd.daemon.notify import ERR

if TYPE_CHECKING:
    from lbd.daemon.service import Service

log = logging.getLogger("lbd.daemon.metrics_http")

MAX_HEAD = 8192
"""Bytes of request line and headers; more is answered 400."""
MAX_LINES = 64
TIMEOUT = 2.0
"""Seconds for the whole exchange (read the head, write the answer)."""
MAX_CLIENTS = 8
PATH = "/metrics"


async def serve(svc: Service) -> MetricsServer | None:
    """Start the server of ``metrics_listen`` (None when unset). A port that cannot be
    had does not stop the node from serving its slices: one journal ERR
    (``MetricsUnavailable``) and a PROBLEM line in ``lbd-cli status``."""
    if svc.config.metrics_listen is None:
        return None
    host, port = metrics_address(svc.config.metrics_listen, svc.config_path)

    def render() -> str:
        svc.catch_up()  # as of now, like lbd-cli (control.dispatch)
        return control.metrics_text(svc, time.monotonic())

    server = MetricsServer(host, port, render)
    try:
        await server.start()
    except OSError as exc:
        line = f"metrics_listen {svc.config.metrics_listen}: {exc.strerror or exc}"
        svc.sink.emit(ERR, f"{line}; serving no metrics", "MetricsUnavailable")
        svc.shell_problems["metrics"] = line
        return None
    return server


class MetricsServer:
    """Serve ``render()`` at ``http://host:port/metrics``."""

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        self.host, self.port = host, port
        self.render = render
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0
        self.served = 0
        """Answers sent (any status), for tests."""

    async def start(self) -> None:
        """Listen; raises OSError (address in use, not local, ...)."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_HEAD, reuse_address=True
        )
        if self.port == 0:  # tests: the port the kernel chose
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await control.close_server(self._server)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()  # a scraper retries at its next interval
            return
        self._clients += 1
        try:
            async with asyncio.timeout(TIMEOUT):
                await self._answer(reader, writer)
        except (TimeoutError, ConnectionError, OSError):
            pass  # a slow or vanished client: nothing more to say
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.5)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_head(reader)
        if request is None:
            await _send(writer, 400, "bad request\n")
            return
        method, target = request
        if method not in ("GET", "HEAD"):
            await _send(writer, 405, "only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
            return
        if target.split("?", 1)[0] != PATH:
            await _send(writer, 404, f"not found; metrics are at {PATH}\n")
            return
        try:
            body = self.render()
        except Exception:  # a bug in the renderer must not reach the loop
            log.exception("rendering the metrics failed")
            await _send(writer, 500, "internal error\n")
            return
        await _send(writer, 200, body, content_type=CONTENT_TYPE, head_only=method == "HEAD")
        self.served += 1


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """(method, target) of the request line, after reading the headers; None if bad."""
    try:
        first = await reader.readline()
        total = len(first)
        for _ in range(MAX_LINES):
            line = await reader.readline()
            total += len(line)
            if total > MAX_HEAD:
                return None
            if line in (b"\r\n", b"\n", b""):
                break
        else:
            return None
    except (asyncio.LimitOverrunError, ValueError):
        return None  # a line longer than MAX_HEAD
    parts = first.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    return parts[0], parts[1]


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    body: str,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
    head_only: bool = False,
) -> None:
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n{extra}\r\n"
    )
    writer.write(head.encode() + (b"" if head_only else data))
    await writer.drain()
