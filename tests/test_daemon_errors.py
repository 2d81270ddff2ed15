"""Mistakes found at start and bugs found at run time end the daemon cleanly (issue 12).

No root needed: a VIP equal to the node's own address is checked by a pure function
(and through ``lbd check-config`` with the address lookup replaced); an exception
escaping an event-loop callback is driven through ``Service._on_loop_error`` on a
Service built without ``__init__``, and through a real asyncio loop.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from lbd.daemon import cli
from lbd.daemon import service as service_module
from lbd.daemon.config import (
    ConfigFileError,
    DaemonConfig,
    check_vips_against_address,
    write_key,
)
from lbd.daemon.notify import ERR, MESSAGE_IDS
from lbd.daemon.service import Service
from lbd.daemon.statedir import acquire_lock


class FakeSink:
    """Records every entry; ``pings_at_emit`` notes how many watchdog pings preceded it."""

    def __init__(self, notifier: FakeNotifier | None = None) -> None:
        self.entries: list[tuple[int, str, str | None, dict[str, str]]] = []
        self.pings_at_emit: list[int] = []
        self.notifier = notifier
        self.context: dict[str, str] = {}

    def emit(
        self,
        priority: int,
        message: str,
        kind: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        self.entries.append((priority, message, kind, dict(fields or {})))
        self.pings_at_emit.append(len(self.notifier.pings) if self.notifier else 0)


class FakeNotifier:
    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval
        self.pings: list[float] = []

    def watchdog_interval(self) -> float | None:
        return self.interval

    def watchdog(self) -> None:
        self.pings.append(asyncio.get_running_loop().time())

    def close(self) -> None:
        pass


def bare_service(sink: FakeSink, notifier: FakeNotifier | None = None) -> Service:
    """A Service with only what the error path touches (no sockets, no kernel)."""
    svc = Service.__new__(Service)
    svc.sink = sink  # type: ignore[assignment]
    svc.notifier = notifier or FakeNotifier()  # type: ignore[assignment]
    svc._done = None
    return svc


def explode() -> None:
    raise RuntimeError("boom\nsecond line")


# ------------------------------------------------------------------ VIP == own address


def test_check_vips_against_address_refuses_the_own_address() -> None:
    check_vips_against_address(
        "/etc/lbd/lbd.toml", ("192.0.2.100", "2001:db8::1"), "192.0.2.11"
    )  # fine
    with pytest.raises(ConfigFileError) as info:
        check_vips_against_address("/etc/lbd/lbd.toml", ("192.0.2.100", "192.0.2.11"), "192.0.2.11")
    err = info.value
    assert (err.path, err.key) == ("/etc/lbd/lbd.toml", "vips")
    assert str(err) == (
        "/etc/lbd/lbd.toml: vips: 192.0.2.11 is this node's own address; a "
        "VIP must be an extra address that no node uses as its own"
    )


def test_run_and_check_config_refuse_a_vip_equal_to_the_resolved_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "cluster.key"
    write_key(key)
    conf = tmp_path / "lbd.toml"
    conf.write_text(f'vips = ["192.0.2.100"]\nkey_file = "{key}"\nnode_id = "n1"\n')
    # As if 192.0.2.100 were the interface's primary address (no address configured).
    monkeypatch.setattr(cli, "resolve_address", lambda interface, address, path: (7, "192.0.2.100"))
    with pytest.raises(ConfigFileError) as info:
        cli._prepare(conf)
    assert (info.value.path, info.value.key) == (str(conf), "vips")
    expected = (
        f"lbd: {conf}: vips: 192.0.2.100 is this node's own address; a VIP must be "
        "an extra address that no node uses as its own\n"
    )
    for command in ("check-config", "run"):
        assert cli.main([command, "--config", str(conf)]) == 2
        assert capsys.readouterr().err == expected


# ------------------------------------------------------------------ unexpected exceptions


def test_message_id_of_internal_error_is_fresh() -> None:
    value = MESSAGE_IDS["InternalError"]
    assert re.fullmatch(r"[0-9a-f]{32}", value)
    assert list(MESSAGE_IDS.values()).count(value) == 1


def test_on_loop_error_logs_one_line_and_finishes_with_1() -> None:
    sink = FakeSink()
    svc = bare_service(sink)
    loop = asyncio.new_event_loop()
    try:
        svc._done = loop.create_future()
        try:
            explode()
        except RuntimeError as exc:
            error = exc
        svc._on_loop_error(
            loop, {"message": "Exception in callback Service._on_timer()", "exception": error}
        )
        assert svc._done.done() and svc._done.result() == 1
    finally:
        loop.close()
    [(priority, message, kind, fields)] = sink.entries
    assert (priority, kind) == (ERR, "InternalError")
    line = explode.__code__.co_firstlineno + 1
    assert message == (
        "internal error, stopping: RuntimeError: boom second line "
        f"(in explode at test_daemon_errors.py:{line})"
    )
    assert "\n" not in message
    assert "Traceback (most recent call last)" in fields["TRACEBACK"]
    assert "Service._on_timer()" in fields["TRACEBACK"]


def test_on_loop_error_without_an_exception_still_stops() -> None:
    sink = FakeSink()
    svc = bare_service(sink)
    loop = asyncio.new_event_loop()
    try:
        svc._done = loop.create_future()
        svc._on_loop_error(loop, {"message": "Task was destroyed but it is pending!"})
        assert svc._done.result() == 1
    finally:
        loop.close()
    assert sink.entries[0][1] == (
        "internal error, stopping: Task was destroyed but it is pending! (in asyncio)"
    )


def test_on_loop_error_stops_the_watchdog_pings() -> None:
    notifier = FakeNotifier(interval=0.001)
    svc = bare_service(FakeSink(notifier), notifier)

    async def scenario() -> None:
        svc._done = asyncio.get_running_loop().create_future()
        svc._watchdog()  # the first ping, and the next one armed
        await asyncio.sleep(0.02)
        assert len(notifier.pings) >= 2
        svc._on_loop_error(asyncio.get_running_loop(), {"message": "x", "exception": None})
        pinged = len(notifier.pings)
        await asyncio.sleep(0.02)
        assert len(notifier.pings) == pinged  # a half-dead daemon must not look healthy

    asyncio.run(asyncio.wait_for(scenario(), 2))


def test_exception_in_a_call_soon_callback_reaches_finish_1() -> None:
    sink = FakeSink()
    svc = bare_service(sink)

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        svc._done = loop.create_future()
        loop.set_exception_handler(svc._on_loop_error)
        loop.call_soon(explode)
        return await asyncio.wait_for(svc._done, 2)

    assert asyncio.run(scenario()) == 1
    assert [entry[2] for entry in sink.entries] == ["InternalError"]
    assert sink.entries[0][1].startswith("internal error, stopping: RuntimeError: boom")


def test_service_run_exits_1_and_still_cleans_up_after_a_callback_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ``Service.run``: handler installed, exit code 1, ``_stop`` run, lock freed."""
    notifier = FakeNotifier(interval=0.002)
    sink = FakeSink(notifier)
    svc = bare_service(sink, notifier)
    svc.config = DaemonConfig(vips=("192.0.2.100",), state_dir=str(tmp_path))
    stopped: list[int] = []

    async def fake_start(state_dir: Path) -> None:
        # Stands in for the sockets and the kernel: a timer callback that fails later.
        asyncio.get_running_loop().call_later(0.02, explode)

    async def fake_stop() -> None:
        pings = len(notifier.pings)
        await asyncio.sleep(0.02)  # a cleanup that takes a while
        stopped.append(len(notifier.pings) - pings)

    monkeypatch.setattr(svc, "_start", fake_start)
    monkeypatch.setattr(svc, "_stop", fake_stop)
    code = asyncio.run(asyncio.wait_for(svc.run(), 2))
    assert code == 1
    assert stopped == [0]  # cleanup ran, and no watchdog ping during it
    assert [entry[2] for entry in sink.entries] == ["InternalError"]
    assert sink.pings_at_emit[0] >= 1 and len(notifier.pings) == sink.pings_at_emit[0]
    acquire_lock(tmp_path)  # the lock was released (no "already running")


def test_cli_run_turns_an_unforeseen_exception_into_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("LBD_JOURNAL_SOCKET", "JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        monkeypatch.delenv(name, raising=False)
    cfg = DaemonConfig(vips=("192.0.2.100",), state_dir=str(tmp_path))
    monkeypatch.setattr(cli, "_prepare", lambda path: (cfg, None, "n1", 7, "192.0.2.11"))

    class Crashing:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        async def run(self) -> int:
            raise ValueError("bad VIP '192.0.2.100/24'\n(detail)")

    monkeypatch.setattr(service_module, "Service", Crashing)
    assert cli.main(["run", "--config", str(tmp_path / "lbd.toml")]) == 1
    err = capsys.readouterr().err
    assert err == (
        "lbd: error: internal error, stopping: ValueError: bad VIP '192.0.2.100/24' (detail)\n"
    )


def test_a_quorum_base_stored_with_node_names_is_read_as_wire_ids(tmp_path: Path) -> None:
    """Records written before wire IDs hold names: a restart must still find its base."""
    from lbd.daemon.statedir import load_quorum_base, save_quorum_base
    from lbd.protocol.messages import wire_id

    save_quorum_base(tmp_path, ("node0", "node1"), 4, ("node0", "node1", "node2"))
    base, epoch, previous = load_quorum_base(tmp_path)
    assert base == tuple(sorted((wire_id("node0"), wire_id("node1"))))
    assert epoch == 4
    assert previous == tuple(sorted(wire_id(n) for n in ("node0", "node1", "node2")))
    save_quorum_base(tmp_path, base, 5, None)
    assert load_quorum_base(tmp_path) == (base, 5, None)


def test_a_corrupt_quorum_base_is_a_clear_error_not_a_first_start(tmp_path: Path) -> None:
    from lbd.daemon.config import ConfigFileError
    from lbd.daemon.statedir import load_quorum_base

    record = tmp_path / "quorum-base.json"
    for text in ('{"version": 1, "base": "node0", "epoch": 3}', "{not json", '{"version": 9}'):
        record.write_text(text)
        with pytest.raises(ConfigFileError, match=r"corrupt quorum base.*delete the file"):
            load_quorum_base(tmp_path)
    record.unlink()
    assert load_quorum_base(tmp_path) == ((), 0, None)  # no record: a first start


def test_a_failed_persist_closes_the_owner_table_and_stops_with_1(tmp_path: Path) -> None:
    """The actions queued behind a PersistBase are never carried out if it fails."""
    from types import SimpleNamespace

    from lbd.protocol import events as ev
    from lbd.protocol.driver import Driver

    finished: list[int] = []
    sent: list[bytes] = []

    class Sink:
        def __init__(self) -> None:
            self.lines: list[tuple[int, str, str | None]] = []

        def emit(
            self, priority: int, message: str, kind: str | None = None, fields: Any = None
        ) -> None:
            self.lines.append((priority, message, kind))

    class Nft:
        closed = False

        def close(self) -> None:
            self.closed = True

    async def scenario() -> None:
        service = Service.__new__(Service)
        service.sink = Sink()  # type: ignore[assignment]
        nft = Nft()
        service._nft = nft  # type: ignore[assignment]
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        service._state_dir = blocker / "state"  # mkdir fails: ENOTDIR
        done = asyncio.Event()

        def finish(code: int) -> None:
            finished.append(code)
            done.set()

        service._finish = finish  # type: ignore[method-assign]
        service.transmit = sent.append  # type: ignore[method-assign, assignment]
        step = [ev.PersistBase(("a", "b"), 2), ev.Transmit(b"heartbeat")]
        core = SimpleNamespace(events=list, actions=lambda: step)
        service.driver = Driver(core, service)
        assert service.driver.process()  # the persist runs in a thread; the rest waits
        assert service.driver.persisting and sent == []
        await asyncio.wait_for(done.wait(), 5)
        assert finished == [1] and nft.closed and service._nft is None
        assert sent == [] and service.driver.stopped and service.driver.idle
        assert any(kind == "PersistFailed" for _, _, kind in service.sink.lines)  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_owner_and_table_name_no_owner_when_every_member_drains() -> None:
    """Issue 13's small defect: NO_OWNER (-1) used to index the last view member."""
    from types import SimpleNamespace

    from lbd.daemon import control
    from lbd.daemon.config import DaemonConfig
    from lbd.protocol.config import CoreConfig
    from lbd.protocol.membership import Node
    from lbd.protocol.wire import Codec, Keyring

    core = Node(
        CoreConfig(buckets=64), Codec("lbd", Keyring(bytes(32))), "a", 1, 0.0, draining=True
    )
    service = SimpleNamespace(core=core, config=DaemonConfig(buckets=64, vips=("192.0.2.100",)))
    answer = control.owner(service, "198.51.100.7")  # type: ignore[arg-type]
    assert answer["owner"] is None and not answer["held_here"]
    table = asyncio.run(_await(control.table(service)))  # type: ignore[arg-type]
    assert table["counts"] == {"a": 0} and table["ranges"] == {"a": []}


async def _await(awaitable: Any) -> Any:
    return await awaitable


def test_every_foreseeable_error_is_an_lbd_error() -> None:
    """One exception family (issue 13's small defect: these three were plain Exceptions)."""
    from lbd.daemon.control import CommandError
    from lbd.daemon.ctl import CtlError
    from lbd.netcfg.statefile import RecordError
    from lbd.protocol.errors import LbdError

    for error in (CommandError, CtlError, RecordError):
        assert issubclass(error, LbdError), error
