"""metrics_listen: the config key, and the tiny HTTP server on in-memory streams.

No socket is opened here (the namespace test scrapes a real daemon over TCP): the
server's handler is fed an ``asyncio.StreamReader`` and a writer that records.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_metrics_parse import parse

from lbd.daemon import metrics_http
from lbd.daemon.config import ConfigFileError, metrics_address, parse_config
from lbd.daemon.metrics_http import MAX_CLIENTS, MAX_HEAD, MetricsServer

BODY = "# HELP lbd_up 1: up.\n# TYPE lbd_up gauge\nlbd_up 1\n"


class Writer:
    """What the handler writes, and whether it closed."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def exchange(
    request: bytes,
    *,
    eof: bool = True,
    server: MetricsServer | None = None,
) -> tuple[int | None, dict[str, str], bytes, Writer]:
    """Feed ``request`` to a server's handler: (status, headers, body, writer)."""
    server = server or MetricsServer("127.0.0.1", 0, lambda: BODY)

    async def run() -> Writer:
        reader = asyncio.StreamReader(limit=MAX_HEAD)
        reader.feed_data(request)
        if eof:
            reader.feed_eof()
        writer = Writer()
        await server._serve(reader, writer)  # type: ignore[arg-type]
        return writer

    writer = asyncio.run(run())
    if not writer.data:
        return None, {}, b"", writer
    head, _, body = writer.data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body, writer


def test_get_metrics_answers_the_exposition() -> None:
    status, headers, body, writer = exchange(
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n", eof=False
    )
    assert status == 200 and writer.closed
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    assert parse(body.decode())["lbd_up"].value() == 1


def test_head_query_string_and_bare_newlines() -> None:
    status, headers, body, _ = exchange(b"HEAD /metrics?x=1 HTTP/1.0\n\n")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(BODY)


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
    (b"hello\r\n\r\n", 400),
    (b"GET /metrics SPDY/3\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 400),
])  # fmt: skip
def test_anything_else_is_refused(request_bytes: bytes, expected: int) -> None:
    status, _, _, writer = exchange(request_bytes)
    assert status == expected and writer.closed


def test_a_slow_client_is_dropped_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "TIMEOUT", 0.05)
    status, _, _, writer = exchange(b"GET /metrics HTTP/1.1\r\n", eof=False)
    assert status is None and writer.closed


def test_clients_beyond_the_limit_are_closed_at_once() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: BODY)
    server._clients = MAX_CLIENTS
    status, _, _, writer = exchange(b"GET /metrics HTTP/1.1\r\n\r\n", server=server)
    assert status is None and writer.closed and server._clients == MAX_CLIENTS


def test_a_renderer_bug_is_a_500_not_a_crash() -> None:
    def broken() -> str:
        raise RuntimeError("bug")

    status, _, _, _ = exchange(
        b"GET /metrics HTTP/1.1\r\n\r\n", server=MetricsServer("127.0.0.1", 0, broken)
    )
    assert status == 500


# ------------------------------------------------------------------ the config key


def config(**extra: Any) -> dict[str, Any]:
    return {"vips": ["192.0.2.100"], **extra}


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    ("127.0.0.53:1", ("127.0.0.53", 1)),
    ("localhost:9477", ("127.0.0.1", 9477)),
    ("[::1]:9477", ("::1", 9477)),
])  # fmt: skip
def test_loopback_addresses_are_taken(text: str, expected: tuple[str, int]) -> None:
    assert metrics_address(text) == expected
    assert parse_config(config(metrics_listen=text)).metrics_listen == text


def test_off_by_default() -> None:
    assert parse_config(config()).metrics_listen is None


@pytest.mark.parametrize(("value", "problem"), [
    ("192.0.2.1:9477", "192.0.2.1 is not a loopback address"),
    ("0.0.0.0:9477", "0.0.0.0 is not a loopback address"),
    ("[2001:db8::1]:9477", "2001:db8::1 is not a loopback address"),
    ("::1:9477", "write an IPv6 host in brackets"),
    ("127.0.0.1", "is not HOST:PORT"),
    (":9477", "is not HOST:PORT"),
    ("127.0.0.1:0", "'0' is not a port"),
    ("127.0.0.1:65536", "'65536' is not a port"),
    ("127.0.0.1:http", "'http' is not a port"),
    ("metrics.example:9477", "'metrics.example' is not an IP address"),
    (9477, "expected a string, got int"),
])  # fmt: skip
def test_a_bad_value_is_one_line_naming_file_and_key(value: Any, problem: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        parse_config(config(metrics_listen=value), Path("/etc/lbd/lbd.toml"))
    text = str(info.value)
    assert text.startswith("/etc/lbd/lbd.toml: metrics_listen: ") and "\n" not in text
    assert problem in text, text
