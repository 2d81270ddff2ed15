"""One run of a service check (http, tcp, exec), the rise/fall counter, interfaces.

Every probe is a coroutine bounded by its timeout that returns a :class:`Result` and
never raises for anything the checked service does: a refused connection, a bad HTTP
answer, a program that hangs or is missing are failed results with a reason. Nothing
here blocks the event loop: sockets through ``asyncio.open_connection``, programs
through ``asyncio.create_subprocess_exec``.

An exec program runs without a shell, in a new session (its own process group), as
the check user (``user``/``group``/``extra_groups=[]``: no supplementary groups), with
a clean environment, stdin from /dev/null, cwd "/". When it exits or its time is up,
its process group is killed (``SIGKILL``: leftovers in the background go with it) and
it is reaped; its output (stdout and stderr) is kept, at most ``OUTPUT_LIMIT`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from lbd.daemon.healthconfig import parse_url, split_host_port

OUTPUT_LIMIT = 512
"""Bytes of an exec's output (or an HTTP status line) kept for status and the journal."""
EXEC_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REAP_TIMEOUT = 1.0
"""How long a killed program may take to be reaped, and its pipe to close."""
LINE_LIMIT = 4096
IFF_UP = 0x1
SYSFS_NET = "/sys/class/net"
_STATUS_LINE = re.compile(rb"HTTP/\d\.\d +(\d{3})(?: |\r?\n|$)")


@dataclass(frozen=True, slots=True)
class Result:
    """One run: passed or not, why ("HTTP 503", "connection refused", "timed out
    after 0.30 s", "exit status 2"), how long it took, what it said."""

    ok: bool
    reason: str
    latency: float
    output: str = ""


def _clip(data: bytes | bytearray) -> str:
    return data[:OUTPUT_LIMIT].decode("utf-8", "replace").strip()


def _oserror(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


async def bounded(seconds: float, probe: Awaitable[Result]) -> Result:
    """``probe`` within ``seconds``; a timed-out run fails with the time it had."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(seconds):
            result = await probe
    except TimeoutError:
        return Result(False, f"timed out after {seconds:.2f} s", loop.time() - start)
    except OSError as exc:
        return Result(False, _oserror(exc), loop.time() - start)
    return Result(result.ok, result.reason, loop.time() - start, result.output)


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, limit=LINE_LIMIT)


def _close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()  # nothing left to say; a FIN handshake could only hang


async def _http(url: str) -> Result:
    host, port, path = parse_url(url)
    reader, writer = await _connect(host, port)
    try:
        name = f"[{host}]" if ":" in host else host
        writer.write(
            f"GET {path} HTTP/1.0\r\nHost: {name}:{port}\r\nUser-Agent: lbd-check"
            "\r\nConnection: close\r\n\r\n".encode("latin-1", "replace")
        )
        await writer.drain()
        try:
            line = await reader.readline()
        except ValueError:  # longer than LINE_LIMIT
            return Result(False, "bad HTTP response (status line too long)", 0.0)
    finally:
        _close(writer)
    match = _STATUS_LINE.match(line)
    if match is None:
        what = "no HTTP response" if not line else "bad HTTP response"
        return Result(False, what, 0.0, _clip(line))
    code = int(match.group(1))
    return Result(200 <= code < 400, f"HTTP {code}", 0.0, _clip(line))


async def _tcp(target: str) -> Result:
    _, writer = await _connect(*split_host_port(target))
    _close(writer)
    return Result(True, "connected", 0.0)


async def read_line_tcp(target: str) -> Result:
    """The agent's tcp form: connect, read one line (the answer is the output)."""
    reader, writer = await _connect(*split_host_port(target))
    try:
        try:
            line = await reader.readline()
        except ValueError:
            return Result(False, "answer line too long", 0.0)
    finally:
        _close(writer)
    if not line.strip():
        return Result(False, "closed without an answer", 0.0)
    return Result(True, "answered", 0.0, _clip(line))


def exec_env(name: str) -> dict[str, str]:
    return {"PATH": EXEC_PATH, "LANG": "C.UTF-8", "LBD_CHECK": name}


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The group is the one we made (start_new_session): the child and its own children.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Kill the program's group and reap the program (bounded)."""
    _kill_group(proc)
    if proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REAP_TIMEOUT):
                await proc.wait()


async def run_exec(
    argv: tuple[str, ...],
    seconds: float,
    name: str,
    account: pwd.struct_passwd | None,
    *,
    stderr: bool = True,
    started: Callable[[int], None] | None = None,
) -> Result:
    """Run ``argv`` as ``account`` (None: as ourselves) for at most ``seconds``.

    Pass = exit status 0. ``stderr`` False drops stderr (the agent's answer is stdout
    only). ``started`` learns the child's PID (tests look for it afterwards).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    ids: dict[str, object] = {}
    if account is not None:
        ids = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    spawn = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if stderr else asyncio.subprocess.DEVNULL,
            env=exec_env(name),
            cwd="/",
            start_new_session=True,
            **ids,  # type: ignore[arg-type]
        )
    )
    try:
        proc = await asyncio.shield(spawn)
    except OSError as exc:
        return Result(False, f"cannot run {argv[0]}: {_oserror(exc)}", loop.time() - start)
    except asyncio.CancelledError:
        # Stopped while the program starts: asyncio would kill only the program
        # itself, not what it started already. Let it start, then end its group.
        with contextlib.suppress(Exception):
            await _end(await asyncio.wait_for(spawn, REAP_TIMEOUT))
        raise
    if started is not None:
        started(proc.pid)
    output = bytearray()

    pipe = proc.stdout

    async def collect() -> None:
        while pipe is not None and (chunk := await pipe.read(65536)):
            output.extend(chunk[: max(0, OUTPUT_LIMIT - len(output))])

    reader = asyncio.ensure_future(collect())
    status: int | None = None
    try:
        async with asyncio.timeout_at(start + seconds):
            status = await proc.wait()
    except TimeoutError:
        pass
    finally:  # also on cancellation (stop): nothing of ours outlives the run
        await _end(proc)
        # The pipe closes when the group is gone; a program that left the group and
        # kept it open must not hold the check for ever.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(reader), REAP_TIMEOUT)
        reader.cancel()
    latency = loop.time() - start
    if status is None:
        return Result(False, f"timed out after {seconds:.2f} s", latency, _clip(output))
    if status < 0:
        return Result(False, f"killed by signal {-status}", latency, _clip(output))
    return Result(status == 0, f"exit status {status}", latency, _clip(output))


def probe_for(
    kind: str,
    target: str | tuple[str, ...],
    timeout: float,
    name: str,
    account: pwd.struct_passwd | None,
) -> Callable[[], Awaitable[Result]]:
    """The bounded run of one check."""
    if isinstance(target, tuple):  # exec
        return lambda: run_exec(target, timeout, name, account)
    coro = _http if kind == "http" else _tcp
    return lambda: bounded(timeout, coro(target))


async def repeat(interval: float, run: Callable[[], Awaitable[object]]) -> None:
    """Call ``run`` for ever; a run starts at the later of the previous start plus
    ``interval`` and the previous run's end: never two at once, never a burst."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await run()
        await asyncio.sleep(max(0.0, start + interval - loop.time()))


class RiseFall:
    """Consecutive results to a state: healthy after ``rise`` passes in a row,
    unhealthy after ``fall`` failures in a row. Starts unhealthy."""

    def __init__(self, rise: int, fall: int, now: float) -> None:
        self.rise, self.fall = rise, fall
        self.healthy = False
        self.passes = self.fails = 0
        self.since = now

    def feed(self, ok: bool, now: float) -> bool:
        """Count one result; True when the state changed."""
        if ok:
            self.passes, self.fails = self.passes + 1, 0
        else:
            self.passes, self.fails = 0, self.fails + 1
        flip = (self.passes >= self.rise) if not self.healthy else (self.fails >= self.fall)
        if flip:
            self.healthy = not self.healthy
            self.since = now
        return flip


def interface_state(name: str, sysfs: str = SYSFS_NET) -> tuple[bool, str]:
    """(up, why): up means IFF_UP and carrier; a missing interface is down."""
    base = Path(sysfs) / name
    try:
        flags = int((base / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return False, "missing"
    if not flags & IFF_UP:
        return False, "administratively down"
    try:
        carrier = (base / "carrier").read_text().strip()
    except OSError:  # EINVAL while the device is down
        carrier = "0"
    if carrier != "1":
        return False, "no carrier"
    return True, "up"
