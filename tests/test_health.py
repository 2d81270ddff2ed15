"""Service checks and the load agent (daemon/health.py, checks.py, agent.py,
healthconfig.py): config, rise/fall, real http/tcp/exec runs on 127.0.0.1, the agent.

Exec tests need root (they run programs as the ``lbd-check`` user, created here if
missing) and put their scripts in a root-owned 0755 directory under /tmp: they are
marked ``root``, which ``make check`` leaves out.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lbd.daemon import checks, health
from lbd.daemon.agent import (
    HYSTERESIS_POINTS,
    RATE_LIMIT,
    AgentAnswer,
    LoadState,
    parse_agent_line,
)
from lbd.daemon.checks import OUTPUT_LIMIT, Result, RiseFall
from lbd.daemon.config import ConfigFileError, DaemonConfig, load_config, parse_config
from lbd.daemon.health import HealthMonitor

T = TypeVar("T")
CONF = "/etc/lbd/lbd.toml"
MINIMAL: dict[str, Any] = {"vips": ["192.0.2.100"]}
USER = "lbd-check"
LIMIT = 10.0  # every scenario, bounded


def run(coro: Awaitable[T], limit: float = LIMIT) -> T:
    return asyncio.run(asyncio.wait_for(coro, limit))


def cfg_with(**keys: Any) -> DaemonConfig:
    return parse_config({**MINIMAL, **keys}, CONF)


def error_of(**keys: Any) -> str:
    with pytest.raises(ConfigFileError) as info:
        cfg_with(**keys)
    text = str(info.value)
    assert "\n" not in text
    return text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def check_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("exec checks run as another user: needs root")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
            timeout=30,
        )
        return pwd.getpwnam(USER)


@pytest.fixture
def scripts(check_user: pwd.struct_passwd) -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp (sticky), reachable by the check user."""
    path = Path(tempfile.mkdtemp(prefix="lbd-health-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text(body)
    path.chmod(mode)
    return path


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ config


def test_defaults_and_empty() -> None:
    cfg = cfg_with()
    assert (cfg.checks, cfg.track_interface, cfg.agent) == ((), (), None)
    assert (cfg.check_user, cfg.check_allow_root) == ("lbd-check", False)
    cfg = cfg_with(
        check=[
            {"name": "web", "tcp": "127.0.0.1:80"},
            {"name": "fast", "http": "http://[::1]:8080/h?x=1", "interval": 0.4},
        ],
        agent={"tcp": "127.0.0.1:9999"},
        track_interface="eth1",
    )
    web, fast = cfg.checks
    assert (web.kind, web.target, web.interval, web.timeout, web.rise, web.fall) == (
        "tcp",
        "127.0.0.1:80",
        1.0,
        0.5,
        2,
        2,
    )
    assert (fast.interval, fast.timeout) == (0.4, 0.2)  # default timeout stays below
    assert cfg.agent is not None and (cfg.agent.interval, cfg.agent.timeout) == (2.0, 1.0)
    assert cfg.track_interface == ("eth1",)


def test_toml_file_with_every_key(tmp_path: Path) -> None:
    conf = tmp_path / "lbd.toml"
    conf.write_text(
        'vips = ["192.0.2.100"]\ntrack_interface = ["eth1", "eth2"]\n'
        'check_user = "nobody"\n\n'
        '[[check]]\nname = "web"\nhttp = "http://127.0.0.1:80/healthz"\n'
        "interval = 0.5\ntimeout = 0.3\nrise = 3\nfall = 1\n\n"
        '[[check]]\nname = "dns"\ntcp = "127.0.0.1:53"\n\n'
        '[agent]\ntcp = "127.0.0.1:9999"\ninterval = 3\ntimeout = 1\n'
    )
    cfg = load_config(conf)
    assert [(c.name, c.kind, c.interval, c.timeout, c.rise, c.fall) for c in cfg.checks] == [
        ("web", "http", 0.5, 0.3, 3, 1),
        ("dns", "tcp", 1.0, 0.5, 2, 2),
    ]
    assert cfg.agent is not None and (cfg.agent.kind, cfg.agent.interval) == ("tcp", 3.0)
    assert cfg.track_interface == ("eth1", "eth2")


WEB = {"name": "web", "tcp": "127.0.0.1:80"}


@pytest.mark.parametrize(
    ("keys", "key", "words"),
    [
        ({"check": [WEB, {"http": "http://x/"}]}, "check[2].name", "is missing"),
        ({"check": [{"name": "a b", "tcp": "h:1"}]}, "check[1].name", "must match"),
        ({"check": [{"name": "x" * 33, "tcp": "h:1"}]}, "check[1].name", "must match"),
        ({"check": [WEB, WEB]}, "check[web].name", "two checks"),
        ({"check": [{"name": "web"}]}, "check[web]", "exactly one of http, tcp, exec"),
        ({"check": [{**WEB, "http": "http://h/"}]}, "check[web]", "has http and tcp"),
        ({"check": [{**WEB, "timeout": 1.0}]}, "check[web].timeout", "below the interval"),
        ({"check": [{**WEB, "timeout": 0}]}, "check[web].timeout", "above 0"),
        ({"check": [{**WEB, "timeout": "1s"}]}, "check[web].timeout", "a number"),
        ({"check": [{**WEB, "interval": 0}]}, "check[web].interval", "out of range"),
        ({"check": [{**WEB, "interval": 3601}]}, "check[web].interval", "out of range"),
        ({"check": [{**WEB, "interval": True}]}, "check[web].interval", "got bool"),
        ({"check": [{**WEB, "interval": float("nan")}]}, "check[web].interval", "not a number"),
        ({"check": [{**WEB, "rise": 0}]}, "check[web].rise", "out of range 1..100"),
        ({"check": [{**WEB, "fall": 101}]}, "check[web].fall", "out of range 1..100"),
        ({"check": [{**WEB, "fall": 1.5}]}, "check[web].fall", "an integer"),
        ({"check": [{**WEB, "colour": 1}]}, "check[web].colour", "unknown key"),
        (
            {"check": [{**WEB, "track_interface": ["eth1"]}]},
            "check[web].track_interface",
            "top-level key",
        ),
        ({"check": [{"name": "w", "http": "https://h/"}]}, "check[w].http", "only http://"),
        ({"check": [{"name": "w", "http": "http://:80/"}]}, "check[w].http", "needs a host"),
        ({"check": [{"name": "w", "http": "http://h:99999/"}]}, "check[w].http", "bad port"),
        ({"check": [{"name": "w", "tcp": "127.0.0.1"}]}, "check[w].tcp", "host:port"),
        ({"check": [{"name": "w", "tcp": "::1:80"}]}, "check[w].tcp", "brackets"),
        ({"check": [{"name": "w", "tcp": "h:0"}]}, "check[w].tcp", "1..65535"),
        ({"check": [{"name": "w", "tcp": 80}]}, "check[w].tcp", "expected a string"),
        ({"check": [{"name": "w", "exec": "/bin/true"}]}, "check[w].exec", "no shell"),
        ({"check": [{"name": "w", "exec": []}]}, "check[w].exec", "non-empty list"),
        ({"check": [{"name": "w", "exec": ["true"]}]}, "check[w].exec", "not an absolute"),
        ({"check": {"name": "w"}}, "check", "[[check]] tables"),
        ({"agent": {"tcp": "h:1", "exec": ["/bin/x"]}}, "agent", "has tcp and exec"),
        ({"agent": {"http": "http://h/"}}, "agent.http", "unknown key"),
        ({"agent": {"tcp": "h:1", "timeout": 2.0}}, "agent.timeout", "below the interval"),
        ({"agent": "h:1"}, "agent", "[agent] table"),
        ({"track_interface": 5}, "track_interface", "list of interface names"),
        ({"track_interface": ["a/b"]}, "track_interface", "not an interface name"),
        ({"track_interface": ["x" * 16]}, "track_interface", "not an interface name"),
        ({"track_interface": ["e", "e"]}, "track_interface", "more than once"),
        ({"check_allow_root": "yes"}, "check_allow_root", "true or false"),
        ({"check_user": 0}, "check_user", "a string"),
    ],
)
def test_bad_values_name_their_key(keys: dict[str, Any], key: str, words: str) -> None:
    text = error_of(**keys)
    assert text.startswith(f"{CONF}: {key}: "), text
    assert words in text, text


@pytest.mark.root
def test_missing_check_user_refused_only_with_exec(scripts: Path) -> None:
    prog = script(scripts, "ok", "#!/bin/sh\nexit 0\n")
    cfg_with(check_user="lbd-no-such-user", check=[WEB], agent={"tcp": "h:1"})
    for keys in ({"check": [{"name": "x", "exec": [str(prog)]}]}, {"agent": {"exec": [str(prog)]}}):
        text = error_of(check_user="lbd-no-such-user", **keys)
        assert text.startswith(f"{CONF}: check_user: user 'lbd-no-such-user' does not exist")
        assert (
            "useradd --system --no-create-home --shell /usr/sbin/nologin lbd-no-such-user"
        ) in text


@pytest.mark.root
def test_root_check_user_needs_allow(scripts: Path) -> None:
    prog = script(scripts, "ok", "#!/bin/sh\nexit 0\n")
    check = [{"name": "x", "exec": [str(prog)]}]
    text = error_of(check_user="root", check=check)
    assert text.startswith(f"{CONF}: check_user: 'root' is root") and "check_allow_root" in text
    assert cfg_with(check_user="root", check_allow_root=True, check=check).check_user == "root"
    assert cfg_with(check_user="root", check=[WEB]).check_user == "root"  # no exec: unused


@pytest.mark.root
def test_exec_script_security(scripts: Path) -> None:
    def refused(path: Path | str) -> str:
        return error_of(check=[{"name": "s", "exec": [str(path), "--quick"]}])

    good = script(scripts, "good", "#!/bin/sh\nexit 0\n")
    assert cfg_with(check=[{"name": "s", "exec": [str(good)]}]).checks[0].target == (str(good),)
    assert "writable by group (mode 0775)" in refused(script(scripts, "gw", "#!/bin/sh\n", 0o775))
    assert "writable by others (mode 0757)" in refused(script(scripts, "ow", "#!/bin/sh\n", 0o757))
    assert "not executable by lbd-check" in refused(script(scripts, "nx", "#!/bin/sh\n", 0o744))
    assert "No such file" in refused(scripts / "absent")
    assert "not a regular file" in refused(scripts)
    owned = script(scripts, "owned", "#!/bin/sh\n")
    os.chown(owned, 65534, 65534)
    assert "owned by uid 65534, not root" in refused(owned)
    loose = scripts / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o777)  # other-writable, no sticky bit: the program could be swapped
    text = refused(script(loose, "prog", "#!/bin/sh\n"))
    assert f"directory {loose} (above {loose}/prog) is writable by group" in text
    theirs = scripts / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    assert f"directory {theirs}" in refused(script(theirs, "prog", "#!/bin/sh\n"))
    link = scripts / "link"  # a safe-looking path into an unsafe directory
    link.symlink_to(loose / "prog")
    assert f"directory {loose}" in refused(link)
    assert f"{CONF}: check[s].exec: " in refused(owned)


# ------------------------------------------------------------------ rise/fall


def test_rise_fall_state_machine() -> None:
    state = RiseFall(rise=2, fall=3, now=0.0)
    assert not state.healthy  # starts unhealthy
    assert [state.feed(ok, t) for t, ok in enumerate([False, True, False, True], 1)] == [False] * 4
    assert not state.healthy and state.passes == 1
    assert state.feed(True, 5.0) and state.healthy and state.since == 5.0
    assert not state.feed(False, 6.0) and not state.feed(False, 7.0)
    assert not state.feed(True, 8.0)  # a pass resets the failures
    assert not state.feed(False, 9.0) and not state.feed(False, 10.0)
    assert state.feed(False, 11.0) and not state.healthy and state.since == 11.0


def test_monitor_starts_unhealthy_and_reports_transitions() -> None:
    clock = Clock()
    changes: list[tuple[str, bool, str]] = []
    cfg = cfg_with(
        check=[{**WEB, "rise": 2, "fall": 1}, {"name": "db", "tcp": "h:5432", "rise": 1}]
    )
    mon = HealthMonitor(cfg, on_change=lambda *a: changes.append(a), clock=clock)
    assert mon.reasons == {"check web", "check db"} and not mon.healthy
    mon.record("web", Result(True, "connected", 0.001))
    assert mon.reasons == {"check web", "check db"} and changes == []
    clock.now += 1
    mon.record("web", Result(True, "connected", 0.002))
    mon.record("db", Result(True, "connected", 0.003))
    assert mon.healthy and mon.reasons == frozenset()
    assert changes == [("check web", True, "connected"), ("check db", True, "connected")]
    clock.now += 1
    mon.record("web", Result(False, "exit status 2", 0.004, "disk full"))
    assert mon.reasons == {"check web"}
    assert changes[-1] == ("check web", False, "exit status 2: disk full")
    row = next(r for r in mon.status() if r["name"] == "web")
    assert row == {
        "name": "web",
        "kind": "tcp",
        "state": "unhealthy",
        "result": "fail",
        "reason": "exit status 2",
        "latency_ms": 4.0,
        "output": "disk full",
        "since": 1002.0,
        "passes": 0,
        "fails": 1,
        "rise": 2,
        "fall": 1,
    }


def test_a_failing_callback_does_not_stop_the_checks() -> None:
    errors: list[dict[str, Any]] = []

    def boom(*_: object) -> None:
        raise RuntimeError("integrator bug")

    async def scenario() -> HealthMonitor:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        mon = HealthMonitor(cfg_with(check=[{**WEB, "rise": 1}]), on_change=boom)
        mon.record("web", Result(True, "connected", 0.0))
        return mon

    assert run(scenario()).healthy
    assert isinstance(errors[0]["exception"], RuntimeError)


# ------------------------------------------------------------------ http and tcp


async def http_server(
    answers: dict[str, bytes | None], seen: list[bytes]
) -> tuple[asyncio.Server, int]:
    """Answers by path; None: never answers."""
    forever = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        seen.append(request)
        answer = answers[request.split()[1].decode()]
        if answer is None:
            await forever.wait()
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_http_check_results() -> None:
    seen: list[bytes] = []
    answers: dict[str, bytes | None] = {
        "/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/moved": b"HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n",
        "/sick": b"HTTP/1.1 503 Service Unavailable\r\n\r\ndb down",
        "/junk": b"SSH-2.0-OpenSSH\r\n",
        "/empty": b"",
        "/hang": None,
    }

    async def scenario() -> dict[str, Result]:
        server, port = await http_server(answers, seen)
        results = {}
        async with server:
            for path in answers:
                probe = checks.probe_for(
                    "http",
                    f"http://127.0.0.1:{port}{path}",
                    0.3 if path == "/hang" else 3.0,
                    "web",
                    None,
                )
                results[path] = await probe()
        refused = checks.probe_for("http", f"http://127.0.0.1:{free_port()}/", 3.0, "w", None)
        results["refused"] = await refused()
        return results

    results = run(scenario())
    assert (results["/ok"].ok, results["/ok"].reason) == (True, "HTTP 200")
    assert results["/ok"].output == "HTTP/1.1 200 OK"
    assert (results["/moved"].ok, results["/moved"].reason) == (True, "HTTP 302")
    assert (results["/sick"].ok, results["/sick"].reason) == (False, "HTTP 503")
    assert (results["/junk"].ok, results["/junk"].reason) == (False, "bad HTTP response")
    assert (results["/empty"].ok, results["/empty"].reason) == (False, "no HTTP response")
    hang = results["/hang"]
    assert (hang.ok, hang.reason) == (False, "timed out after 0.30 s")
    assert 0.29 <= hang.latency < 2.0
    assert (results["refused"].ok, results["refused"].reason) == (False, "connection refused")
    assert seen[0].startswith(b"GET /ok HTTP/1.0\r\nHost: 127.0.0.1:")
    assert results["/ok"].latency > 0


def test_tcp_check() -> None:
    async def scenario() -> tuple[Result, Result]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            up = await checks.probe_for("tcp", f"127.0.0.1:{port}", 0.5, "t", None)()
        down = await checks.probe_for("tcp", f"127.0.0.1:{free_port()}", 0.5, "t", None)()
        return up, down

    up, down = run(scenario())
    assert (up.ok, up.reason) == (True, "connected")
    assert (down.ok, down.reason) == (False, "connection refused")


def test_monitor_with_a_real_tcp_check_rises_and_falls() -> None:
    changes: list[tuple[str, bool, str]] = []

    async def scenario() -> tuple[frozenset[str], frozenset[str]]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        changed = asyncio.Event()

        def note(*args: Any) -> None:
            changes.append(args)
            changed.set()

        cfg = cfg_with(
            check=[
                {
                    "name": "web",
                    "tcp": f"127.0.0.1:{port}",
                    "interval": 0.3,
                    "timeout": 0.25,
                    "rise": 2,
                    "fall": 2,
                }
            ]
        )
        mon = HealthMonitor(cfg, on_change=note)
        await mon.start()
        await changed.wait()
        up = mon.reasons
        changed.clear()
        server.close()
        await server.wait_closed()
        await changed.wait()
        down = mon.reasons
        await mon.stop()
        return up, down

    up, down = run(scenario())
    assert up == frozenset() and down == {"check web"}
    assert changes == [("check web", True, "connected"), ("check web", False, "connection refused")]


# ------------------------------------------------------------------ scheduling


def schedule(interval: float, work: float, runs: int) -> tuple[list[float], int]:
    """``checks.repeat`` of a run taking ``work`` s: gaps between starts, most at once."""
    starts: list[float] = []
    active = most = 0

    async def scenario() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def one() -> None:
            nonlocal active, most
            starts.append(loop.time())
            active += 1
            most = max(most, active)
            await asyncio.sleep(work)  # the work of the check, not synchronisation
            active -= 1
            if len(starts) == runs:
                done.set()

        task = asyncio.create_task(checks.repeat(interval, one))
        await done.wait()
        task.cancel()

    run(scenario())
    return [b - a for a, b in itertools.pairwise(starts)], most


def test_a_check_never_overlaps_itself() -> None:
    """A run that takes 5× the interval: the next starts only when it ended."""
    gaps, most = schedule(0.01, 0.05, 5)
    assert most == 1
    assert min(gaps) >= 0.049, gaps


def test_runs_start_interval_apart() -> None:
    gaps, most = schedule(0.1, 0.0, 4)
    assert most == 1
    assert all(0.099 <= gap < 0.5 for gap in gaps), gaps


# ------------------------------------------------------------------ exec


@pytest.mark.root
def test_exec_check_pass_fail_output_user_and_env(
    scripts: Path, check_user: pwd.struct_passwd
) -> None:
    ok = script(scripts, "ok", "#!/bin/sh\necho all good\nexit 0\n")
    bad = script(scripts, "bad", "#!/bin/sh\necho 'db down' >&2\nexit 2\n")
    chatty = script(scripts, "chatty", "#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' x\n")
    who = script(
        scripts,
        "who",
        "#!/usr/bin/python3 -I\nimport os\n"
        "print(os.getuid(), os.getgid(), os.getgroups(), os.getcwd(),"
        " sorted(os.environ.items()))\n",
    )

    async def scenario() -> list[Result]:
        return [
            await checks.run_exec((str(p), "--quick"), 2.0, "web", check_user)
            for p in (ok, bad, chatty, who)
        ]

    r_ok, r_bad, r_chatty, r_who = run(scenario())
    assert (r_ok.ok, r_ok.reason, r_ok.output) == (True, "exit status 0", "all good")
    assert (r_bad.ok, r_bad.reason, r_bad.output) == (False, "exit status 2", "db down")
    assert r_chatty.ok and r_chatty.output == "x" * OUTPUT_LIMIT
    env = [("LANG", "C.UTF-8"), ("LBD_CHECK", "web"), ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")]
    assert r_who.output == (f"{check_user.pw_uid} {check_user.pw_gid} [] / {env}"), r_who


@pytest.mark.root
def test_exec_that_cannot_start_fails_with_the_reason(check_user: pwd.struct_passwd) -> None:
    result = run(checks.run_exec(("/nonexistent/prog",), 1.0, "x", check_user))
    assert (result.ok, result.reason) == (
        False,
        "cannot run /nonexistent/prog: no such file or directory",
    )


@pytest.mark.root
def test_exec_timeout_kills_the_child_and_its_group_without_blocking_the_loop(
    scripts: Path, check_user: pwd.struct_passwd
) -> None:
    hang = script(scripts, "hang", "#!/bin/sh\nsleep 30 &\necho $!\nwait\n")
    pids: list[int] = []
    ticks: list[float] = []

    async def scenario() -> Result:
        loop = asyncio.get_running_loop()

        async def heartbeat() -> None:
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(heartbeat())
        result = await checks.run_exec((str(hang),), 1.0, "hang", check_user, started=pids.append)
        beat.cancel()
        return result

    result = run(scenario())
    assert (result.ok, result.reason) == (False, "timed out after 1.00 s")
    assert 1.0 <= result.latency < 1.0 + 2 * checks.REAP_TIMEOUT
    child, grandchild = pids[0], int(result.output)
    assert not alive(child)
    for _ in range(200):  # SIGKILL is delivered asynchronously: bounded look
        if not alive(grandchild):
            break
        subprocess.run(["true"], check=True, timeout=5)
    assert not alive(grandchild)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    # A loop blocked by the run would tick a few times in all, with a gap of 1 s or more.
    assert len(ticks) >= 20 and max(gaps) < 0.5, (len(ticks), max(gaps))


def _running(path: Path) -> list[int]:
    """The programs started from ``path`` and every process in their groups."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":
                stats[int(entry.name)] = (str(path).encode() in cmdline, int(fields[2]))
    leaders = {pid for pid, (ours, _) in stats.items() if ours}
    return sorted(pid for pid, (ours, group) in stats.items() if ours or group in leaders)


@pytest.mark.root
def test_stop_kills_and_reaps_a_running_exec(scripts: Path) -> None:
    hang = script(scripts, "hang", "#!/bin/sh\nsleep 30\n")
    cfg = cfg_with(check=[{"name": "hang", "exec": [str(hang)], "interval": 60, "timeout": 30}])
    found: list[int] = []

    async def scenario() -> bool:
        mon = HealthMonitor(cfg)
        await mon.start()
        for _ in range(500):  # until the program and its sleep run (bounded)
            found[:] = _running(hang)
            if len(found) == 2:
                break
            await asyncio.sleep(0.01)
        tasks = list(mon._tasks)
        await mon.stop()
        return bool(tasks) and all(task.done() for task in tasks)

    assert run(scenario())
    assert len(found) == 2
    for _ in range(200):  # the sleep's SIGKILL lands asynchronously: bounded look
        if not any(alive(pid) for pid in found):
            break
        subprocess.run(["true"], check=True, timeout=5)
    assert not any(alive(pid) for pid in found), [
        (Path(f"/proc/{p}/cmdline").read_bytes(), Path(f"/proc/{p}/stat").read_text())
        for p in found
        if alive(p)
    ]


@pytest.mark.root
def test_monitor_exec_check_keeps_the_output_for_status(scripts: Path) -> None:
    prog = script(scripts, "sick", "#!/bin/sh\necho 'HTTP 500 from backend'\nexit 1\n")
    cfg = cfg_with(
        check=[
            {"name": "app", "exec": [str(prog)], "interval": 5, "timeout": 4, "rise": 1, "fall": 1}
        ]
    )

    async def scenario() -> list[dict[str, Any]]:
        mon = HealthMonitor(cfg)
        recorded = asyncio.Event()
        record = mon.record

        def spy(name: str, result: Result) -> None:
            record(name, result)
            recorded.set()

        mon.record = spy  # type: ignore[method-assign]
        await mon.start()
        await recorded.wait()
        await mon.stop()
        return mon.status()

    row = run(scenario())[0]
    assert (row["kind"], row["state"], row["result"], row["reason"], row["output"]) == (
        "exec",
        "unhealthy",
        "fail",
        "exit status 1",
        "HTTP 500 from backend",
    )


# ------------------------------------------------------------------ interfaces


def fake_link(sysfs: Path, name: str, flags: str, carrier: str | None) -> None:
    link = sysfs / name
    link.mkdir(parents=True, exist_ok=True)
    (link / "flags").write_text(flags + "\n")
    if carrier is None:
        (link / "carrier").unlink(missing_ok=True)
    else:
        (link / "carrier").write_text(carrier + "\n")


def test_interface_state(tmp_path: Path) -> None:
    fake_link(tmp_path, "up", "0x1003", "1")
    fake_link(tmp_path, "admin", "0x1002", None)
    fake_link(tmp_path, "nocarrier", "0x1003", "0")
    assert checks.interface_state("up", str(tmp_path)) == (True, "up")
    assert checks.interface_state("admin", str(tmp_path)) == (False, "administratively down")
    assert checks.interface_state("nocarrier", str(tmp_path)) == (False, "no carrier")
    assert checks.interface_state("gone", str(tmp_path)) == (False, "missing")
    assert checks.interface_state("lo") == (True, "up")  # the real /sys


def test_track_interface_in_the_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "INTERFACE_POLL", 0.02)
    changes: list[tuple[str, bool, str]] = []

    async def scenario() -> list[frozenset[str]]:
        changed = asyncio.Event()

        def note(*args: Any) -> None:
            changes.append(args)
            changed.set()

        mon = HealthMonitor(cfg_with(track_interface=["eth1"]), on_change=note, sysfs=str(tmp_path))
        await mon.start()
        seen = [mon.reasons]  # missing: down at once, without a transition
        fake_link(tmp_path, "eth1", "0x1003", "1")
        await changed.wait()
        seen.append(mon.reasons)
        changed.clear()
        fake_link(tmp_path, "eth1", "0x1003", "0")
        await changed.wait()
        seen.append(mon.reasons)
        await mon.stop()
        return seen

    assert run(scenario()) == [{"interface eth1"}, frozenset(), {"interface eth1"}]
    assert changes == [("interface eth1", True, "up"), ("interface eth1", False, "no carrier")]


# ------------------------------------------------------------------ agent


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("75%", AgentAnswer(75, ())),
        ("drain", AgentAnswer(None, ("drain",))),
        ("up 50%", AgentAnswer(50, ("up",))),
        ("DOWN", AgentAnswer(None, ("down",))),
        ("  Up , 20%,drain \r\n", AgentAnswer(20, ("up", "drain"))),
        ("maint 30% ready", AgentAnswer(30, ())),
        ("0%", AgentAnswer(0, ())),
        ("garbage", None),
        ("150%", None),
        ("-5%", None),
        ("", None),
    ],
)
def test_agent_line(line: str, answer: AgentAnswer | None) -> None:
    assert parse_agent_line(line) == answer


def test_agent_hysteresis_and_rate_limit() -> None:
    load = LoadState(200)
    step = HYSTERESIS_POINTS

    def say(capacity: int, now: float) -> bool:
        return load.apply(AgentAnswer(capacity, ()), now)

    assert not say(100 - step + 1, 0.0) and load.weight == 200  # under the hysteresis
    assert say(100 - step, 0.0) and load.capacity == 90 and load.weight == 180
    assert not say(50, RATE_LIMIT - 0.1) and load.capacity == 90  # rate limited
    assert say(50, RATE_LIMIT) and load.weight == 100
    assert say(0, RATE_LIMIT + 0.1) and load.weight == 0  # to 0: immediate
    assert say(55, RATE_LIMIT + 0.2) and load.weight == 110  # from 0: immediate
    assert not say(55 + step - 1, 2 * RATE_LIMIT + 1)  # hysteresis, with no rate limit
    assert say(55 + step, 2 * RATE_LIMIT + 1) and load.capacity == 65
    assert not say(1, 2 * RATE_LIMIT + 2) and load.capacity == 65
    assert say(1, 3 * RATE_LIMIT + 2) and load.weight == 2
    load.base = 10
    assert load.weight == 1  # at least 1 while the capacity is above 0


def test_agent_words_in_the_monitor() -> None:
    clock = Clock()
    changes: list[tuple[str, bool, str]] = []
    weights: list[int] = []
    drains: list[tuple[bool, str]] = []
    cfg = cfg_with(agent={"tcp": "127.0.0.1:9999"}, weight=200)
    mon = HealthMonitor(
        cfg,
        on_change=lambda *a: changes.append(a),
        on_weight=weights.append,
        on_drain=lambda *a: drains.append(a),
        clock=clock,
    )

    def say(line: str, ok: bool = True) -> None:
        clock.now += 1
        mon.agent_result(Result(ok, "answered", 0.002, line))

    assert (mon.reasons, mon.drain_reasons, mon.weight) == (frozenset(), frozenset(), 200)
    say("drain")
    assert mon.drain_reasons == {"agent"} and mon.healthy
    assert drains == [(True, "agent says 'drain'")]
    say("down")
    assert mon.reasons == {"agent down"} and changes == [("agent", False, "agent says down")]
    say("garbage")
    assert mon.reasons == {"agent down"}  # a useless answer changes nothing
    row = mon.status()[0]
    assert (row["kind"], row["state"], row["result"], row["reason"]) == (
        "agent tcp",
        "down",
        "fail",
        "no usable answer in 'garbage'",
    )
    say("up", ok=False)  # a failed run (e.g. timed out) changes nothing either
    assert mon.reasons == {"agent down"}
    say("UP 50%")
    assert (mon.reasons, mon.drain_reasons, mon.weight) == (frozenset(), frozenset(), 100)
    assert changes[-1] == ("agent", True, "agent says up") and weights == [100]
    assert drains[-1] == (False, "agent says 'UP 50%'")
    say("0%")
    assert mon.drain_reasons == {"agent"} and weights == [100, 0] and len(drains) == 3
    mon.set_weight(100)
    assert weights == [100, 0]  # 0 stays 0
    say("80%")
    assert weights == [100, 0, 80] and mon.status()[0]["capacity"] == 80
    assert drains[-1] == (False, "agent says '80%'")


@pytest.mark.root
def test_agent_over_tcp_and_exec(scripts: Path) -> None:
    prog = script(scripts, "agent", "#!/bin/sh\necho 'noise' >&2\necho '75%'\n")

    async def scenario() -> tuple[list[int], list[int]]:
        async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"up 40%\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        results = []
        async with server:
            for agent in ({"tcp": f"127.0.0.1:{port}"}, {"exec": [str(prog)]}):
                got = asyncio.Event()
                weights: list[int] = []

                def note(weight: int, into: list[int] = weights, ev: asyncio.Event = got) -> None:
                    into.append(weight)
                    ev.set()

                mon = HealthMonitor(
                    cfg_with(agent={**agent, "interval": 5, "timeout": 4}), on_weight=note
                )
                await mon.start()
                await got.wait()
                await mon.stop()
                results.append(weights)
        return results[0], results[1]

    by_tcp, by_exec = run(scenario())
    assert by_tcp == [40] and by_exec == [75]
