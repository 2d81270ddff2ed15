"""sd_notify and native journal messages, captured on Unix sockets the test creates."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbd.daemon.notify import (
    MESSAGE_IDS,
    LogSink,
    Notifier,
    decode_journal,
    encode_journal,
    journal_wanted,
)
from lbd.protocol import events as ev


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def test_notifier_ready_status_watchdog(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval() == 2.0
    notifier.ready("serving 10/100 slices")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 10/100 slices"
    notifier.status("serving 10/100 slices")  # unchanged: not sent again
    notifier.status("draining 0/100 slices")
    assert sock.recv(4096) == b"STATUS=draining 0/100 slices"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.stopping("leaving")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=leaving"
    notifier.close()


def test_notifier_without_systemd_is_silent() -> None:
    notifier = Notifier({})
    assert not notifier.send("READY=1")
    assert notifier.watchdog_interval() is None
    other_pid = Notifier(
        {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    )
    assert other_pid.watchdog_interval() is None
    assert not other_pid.send("READY=1")  # a vanished socket is never fatal


def test_native_encoding_of_newlines_and_binary() -> None:
    data = encode_journal({"MESSAGE": "two\nlines", "PRIORITY": "6", "RAW": b"\x00\xff"})
    assert data.startswith(b"MESSAGE\n" + (9).to_bytes(8, "little") + b"two\nlines\n")
    assert b"PRIORITY=6\n" in data
    assert decode_journal(data) == {"MESSAGE": b"two\nlines", "PRIORITY": b"6", "RAW": b"\x00\xff"}
    with pytest.raises(ValueError):
        encode_journal({"bad name": "x"})
    with pytest.raises(ValueError):
        encode_journal({"_TRUSTED": "x"})


def test_event_goes_to_journal_with_message_id(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    sink = LogSink({"LBD_JOURNAL_SOCKET": path})
    sink.context["NODE"] = "node0"
    sink.event(ev.MemberDead("node2", 0.71), {"SLICES": "1365", "VIEW": "abcd1234"})
    entry = decode_journal(sock.recv(65536))
    assert entry["MESSAGE"] == b"member node2 declared dead after 710 ms"
    assert entry["MESSAGE_ID"].decode() == MESSAGE_IDS["MemberDead"]
    assert entry["PRIORITY"] == b"4"
    assert entry["NODE"] == b"node0"
    assert entry["PEER"] == b"node2"
    assert entry["SLICES"] == b"1365"
    assert entry["VIEW"] == b"abcd1234"
    assert entry["SYSLOG_IDENTIFIER"] == b"lbd"
    sink.close()


def test_every_event_kind_has_a_distinct_message_id() -> None:
    kinds = [t.__name__ for t in ev.Event.__args__]
    assert set(kinds) <= set(MESSAGE_IDS)
    ids = list(MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_stderr_fallback(capsys: pytest.CaptureFixture[str]) -> None:
    sink = LogSink({})
    assert sink.journal_path is None
    sink.event(ev.BucketsGained(5, 40), {})
    assert capsys.readouterr().err == "lbd: info: gained 5 slices, holding 40\n"
    assert journal_wanted({"JOURNAL_STREAM": "0:0"}) is None


def test_events_are_logged_with_names_not_wire_ids() -> None:
    from lbd.daemon.notify import describe, named
    from lbd.protocol import events as ev

    names = {"1a2b3c4d": "web1", "5e6f7a8b": "web2"}
    event = named(ev.ViewChanged(("1a2b3c4d", "5e6f7a8b"), "abcd"), lambda i: names.get(i, i))
    assert describe(event)[0] == "view abcd adopted: web1, web2"
    dead = named(ev.MemberDead("5e6f7a8b", 0.7), lambda i: names.get(i, i))
    assert describe(dead)[0] == "member web2 declared dead after 700 ms"
