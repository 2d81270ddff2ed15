"""The control socket: one JSON request and one JSON response per connection.

Request: ``{"cmd": "members"|"status"|"metrics"|"drain"|"undrain"|"owner"|"table",
...}`` on one line (``owner`` takes ``"address"``; ``metrics`` answers the Prometheus
text of the same snapshot ``status`` answers). Response: ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "one line"}``, then the daemon closes the connection.

The socket is created with mode 0660, owned by root and by group ``lbd`` when
that group exists (otherwise root only): lbd-cli can drain a node, so access is
an operator's privilege. Handlers run on the event loop and never block.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import inspect
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbd.daemon import metrics, snapshot
from lbd.protocol.errors import LbdError
from lbd.protocol.jhash import bucket_of

if TYPE_CHECKING:
    from lbd.daemon.service import Service

log = logging.getLogger("lbd.daemon.control")

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 2.0
SLOW_TIMEOUT = 10.0
"""Bound on a request computed off the loop (``lbd-cli table``)."""
MAX_CLIENTS = 16
"""Connections served at once; more are closed at once (a stuck client holds one)."""
CONTROL_GROUP = "lbd"


class CommandError(LbdError):
    """A request the daemon refuses; the message goes back to lbd-cli."""


def members(service: Service, now: float) -> list[dict[str, Any]]:
    return snapshot.member_rows(service, now)


def status(service: Service, now: float) -> dict[str, Any]:
    """The node's snapshot (snapshot.py): the metrics render the same dict."""
    return snapshot.take(service, now)


def metrics_text(service: Service, now: float) -> str:
    """The Prometheus text exposition of the snapshot (metrics.py)."""
    return metrics.render(snapshot.take(service, now))


def owner(service: Service, address: object) -> dict[str, Any]:
    if not isinstance(address, str):
        raise CommandError("owner needs an address")
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        raise CommandError(f"{address!r} is not an IP address") from None
    cfg = service.config
    bucket = bucket_of(addr, cfg.buckets, cfg.seed, cfg.prefix4, cfg.prefix6)
    core = service.core
    index = int(core.owners()[bucket])
    # A bucket nobody owns (every member draining) has no owner, not the last member.
    owner_id = core.name_of(core.view[index].node_id) if index >= 0 else None
    return {
        "address": str(addr),
        "bucket": bucket,
        "owner": owner_id,
        "view": core.digest(),
        # The view's owner may not have claimed it yet (barrier) or be draining.
        "held_here": bucket in core.held,
    }


def table(service: Service) -> Awaitable[dict[str, Any]]:
    """Bucket ranges per node of the current view: {node: [[first, last], ...]}.

    At 65536 buckets that is tens of thousands of runs (rendezvous hashing scatters
    them) and ~1 MB of JSON: built in a thread from an immutable snapshot, so the
    loop (and a fast lease renewed with ~40 ms to spare) never waits for it."""
    core = service.core
    frozen = (core.owners(), [core.name_of(m.node_id) for m in core.view])
    head = {"view": core.digest(), "buckets": core.config.buckets, "converged": core.agreed}
    return asyncio.to_thread(_ranges, frozen, head)


def _ranges(frozen: tuple[Any, list[str]], head: dict[str, Any]) -> dict[str, Any]:
    owners, names = frozen
    ranges: dict[str, list[list[int]]] = {name: [] for name in names}
    for bucket, index in enumerate(owners.tolist()):
        if index < 0:
            continue  # nobody owns it (every member draining)
        runs = ranges[names[index]]
        if runs and runs[-1][1] == bucket - 1:
            runs[-1][1] = bucket
        else:
            runs.append([bucket, bucket])
    counts = {node: sum(b - a + 1 for a, b in runs) for node, runs in ranges.items()}
    return {**head, "counts": counts, "ranges": ranges}


def dispatch(service: Service, request: dict[str, Any]) -> Any:
    # A settled daemon reads its socket once per interval: catch up first, so that
    # "last heard" and states are as of now, not of the last wake-up.
    service.catch_up()
    now = time.monotonic()
    cmd = request.get("cmd")
    if cmd == "members":
        return members(service, now)
    if cmd == "status":
        return status(service, now)
    if cmd == "metrics":
        return metrics_text(service, now)
    if cmd in ("drain", "undrain"):
        service.set_draining(cmd == "drain", "lbd-cli")
        return {"draining": service.core.draining}
    if cmd == "owner":
        return owner(service, request.get("address"))
    if cmd == "table":
        return table(service)
    raise CommandError(f"unknown command {cmd!r}")


class ControlServer:
    """asyncio Unix-socket server calling ``handler(request) -> result``."""

    def __init__(self, path: str | Path, handler: Callable[[dict[str, Any]], Any]) -> None:
        self.path = Path(path)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Only one daemon runs (the caller holds the instance lock): a socket file
        # left here belongs to a dead predecessor.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o117)  # never world-accessible, not even for a moment
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        try:
            gid = grp.getgrnam(CONTROL_GROUP).gr_gid
        except KeyError:
            gid = None
        if gid is not None:
            os.chown(self.path, -1, gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()  # lbd-cli sees the daemon hang up: it says so and exits 1
            return
        self._clients += 1
        try:
            await self._answer(reader, writer)
        finally:
            self._clients -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = b""
        slow = False
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise CommandError("request must be a JSON object")
                result = self.handler(request)
                slow = inspect.isawaitable(result)
                if slow:  # slow work, done off the loop
                    result = await asyncio.wait_for(result, SLOW_TIMEOUT)
                response = {"ok": True, "result": result}
            except (ValueError, asyncio.LimitOverrunError) as exc:
                response = {"ok": False, "error": f"bad request: {exc}"}
            except CommandError as exc:
                response = {"ok": False, "error": str(exc)}
            except TimeoutError:
                return
            except Exception as exc:  # a bug in a handler must not kill the daemon
                log.exception("control request %r failed", line[:200])
                response = {"ok": False, "error": f"internal error: {exc!r}"}
            text = await asyncio.to_thread(json.dumps, response) if slow else json.dumps(response)
            writer.write(text.encode() + b"\n")
            # A client that never reads must not hold the answer's buffer for ever.
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, OSError, TimeoutError):
            pass  # lbd-cli went away or stopped reading: nothing more to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        await close_server(self._server)
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def close_server(server: asyncio.AbstractServer | None) -> None:
    """Stop listening; wait (bounded) for the served connections to end."""
    if server is not None:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
