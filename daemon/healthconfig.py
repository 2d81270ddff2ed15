"""Settings of the service checks and the load agent: ``[[check]]``, ``[agent]``,
``track_interface``, ``check_user``, ``check_allow_root`` (see daemon/health.py).

Parsing raises ``ConfigError(problem, key=...)`` with keys like ``check[web].timeout``
(``check[2].http`` while the 2nd check has no valid name yet, counting from 1);
daemon/config.py turns it into the one-line ``ConfigFileError`` naming the file.

``check_exec_security`` looks at the host (users, the scripts' files): like keepalived's
script security, a program that anyone but root could change is refused at load time,
because it would run with the rights of the check user, every second, for ever.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lbd.protocol.errors import ConfigError

CHECK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MAX_INTERVAL = 3600.0
CHECK_DEFAULTS = {"interval": 1.0, "timeout": 0.5, "rise": 2, "fall": 2}
AGENT_DEFAULTS = {"interval": 2.0, "timeout": 1.0}
KINDS = ("http", "tcp", "exec")
AGENT_KINDS = ("tcp", "exec")
CHECK_USER = "lbd-check"
CREATE_USER = "useradd --system --no-create-home --shell /usr/sbin/nologin"


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """One ``[[check]]``: ``kind`` is "http", "tcp" or "exec"; ``target`` the URL,
    the "host:port" or the argv (no shell)."""

    name: str
    kind: str
    target: str | tuple[str, ...]
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """The ``[agent]``: ``kind`` "tcp" (connect, read one line) or "exec" (one line
    of output)."""

    kind: str
    target: str | tuple[str, ...]
    interval: float = 2.0
    timeout: float = 1.0


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"expected seconds (a number), got {type(value).__name__}", key=key)
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError("is far too large", key=key) from None
    if not math.isfinite(number):
        raise ConfigError(f"{value} is not a number of seconds", key=key)
    return number


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected an integer, got {type(value).__name__}", key=key)
    if not 1 <= value <= 100:
        raise ConfigError(f"{value} is out of range 1..100", key=key)
    return value


def split_host_port(text: str) -> tuple[str, int]:
    """ "127.0.0.1:80", "[::1]:80" or "name:80" -> (host, port); ValueError says why."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f'{text!r} is not host:port (e.g. "127.0.0.1:80", "[::1]:80")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'{text!r}: write an IPv6 address in brackets, e.g. "[::1]:80"')
    port = int(port_text)
    if not host or not 1 <= port <= 65535:
        raise ValueError(f"{text!r} is not host:port with a port in 1..65535")
    return host, port


def _target(key: str, kind: str, value: Any) -> str | tuple[str, ...]:
    if kind == "exec":
        if isinstance(value, str):
            raise ConfigError(
                'expected a list ["/path/to/program", "arg", ...] (no shell runs it)', key=key
            )
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(item, str) for item in value)
        ):
            raise ConfigError(
                'expected a non-empty list of strings ["/path/to/program", "arg", ...]', key=key
            )
        if not os.path.isabs(value[0]):
            raise ConfigError(f"{value[0]!r} is not an absolute path", key=key)
        if any("\0" in item for item in value):
            raise ConfigError("contains a NUL character", key=key)
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {type(value).__name__}", key=key)
    try:
        if kind == "tcp":
            split_host_port(value)
        else:
            parse_url(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key) from None
    return value


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an http:// URL; ValueError says why not."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(
            f"{url!r}: only http:// URLs (for HTTPS use an exec check, e.g. "
            '["/usr/bin/curl", "-fsS", "-o", "/dev/null", URL])'
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    if not parts.hostname or parts.username or parts.password:
        raise ValueError(f"{url!r} needs a host (and no user:password@)")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise ValueError(f"{url!r} contains white space or control characters")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port, path


def _timing(prefix: str, table: dict[str, Any], defaults: dict[str, float]) -> tuple[float, float]:
    interval = _number(f"{prefix}.interval", table.get("interval", defaults["interval"]))
    if not 0 < interval <= MAX_INTERVAL:
        raise ConfigError(
            f"{interval:g} is out of range (0, {MAX_INTERVAL:g}] seconds", key=f"{prefix}.interval"
        )
    if "timeout" in table:
        timeout = _number(f"{prefix}.timeout", table["timeout"])
    else:  # the default, but always shorter than the interval
        timeout = min(defaults["timeout"], interval / 2)
    if not 0 < timeout < interval:
        raise ConfigError(
            f"{timeout:g} must be above 0 and below the interval ({interval:g} s)",
            key=f"{prefix}.timeout",
        )
    return interval, timeout


def _kind(prefix: str, table: dict[str, Any], kinds: tuple[str, ...]) -> str:
    given = [k for k in kinds if k in table]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise ConfigError(f"needs exactly one of {', '.join(kinds)} (has {what})", key=prefix)
    return given[0]


def parse_checks(raw: Any) -> tuple[CheckSpec, ...]:
    """The ``[[check]]`` array of tables."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError("expected [[check]] tables", key="check")
    specs: list[CheckSpec] = []
    for number, table in enumerate(raw, 1):
        prefix = f"check[{number}]"
        name = table.get("name")
        if not isinstance(name, str) or not CHECK_NAME.fullmatch(name):
            problem = (
                "is missing" if name is None else f"{name!r} must match [A-Za-z0-9_.-]{{1,32}}"
            )
            raise ConfigError(problem, key=f"{prefix}.name")
        prefix = f"check[{name}]"
        if any(s.name == name for s in specs):
            raise ConfigError("is used by two checks", key=f"{prefix}.name")
        for key in table:
            if key == "track_interface":
                raise ConfigError(
                    "is a top-level key: put it above the first [[check]] or other [table]",
                    key=f"{prefix}.{key}",
                )
            if key not in ("name", *KINDS, *CHECK_DEFAULTS):
                raise ConfigError("unknown key", key=f"{prefix}.{key}")
        kind = _kind(prefix, table, KINDS)
        interval, timeout = _timing(prefix, table, CHECK_DEFAULTS)
        specs.append(
            CheckSpec(
                name,
                kind,
                _target(f"{prefix}.{kind}", kind, table[kind]),
                interval,
                timeout,
                _count(f"{prefix}.rise", table.get("rise", CHECK_DEFAULTS["rise"])),
                _count(f"{prefix}.fall", table.get("fall", CHECK_DEFAULTS["fall"])),
            )
        )
    return tuple(specs)


def parse_agent(raw: Any) -> AgentSpec:
    """The ``[agent]`` table."""
    if not isinstance(raw, dict):
        raise ConfigError("expected an [agent] table", key="agent")
    for key in raw:
        if key not in (*AGENT_KINDS, *AGENT_DEFAULTS):
            raise ConfigError("unknown key", key=f"agent.{key}")
    kind = _kind("agent", raw, AGENT_KINDS)
    interval, timeout = _timing("agent", raw, AGENT_DEFAULTS)
    return AgentSpec(kind, _target(f"agent.{kind}", kind, raw[kind]), interval, timeout)


def parse_interfaces(raw: Any) -> tuple[str, ...]:
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError("expected a list of interface names", key="track_interface")
    for name in names:
        if not name or len(name) > 15 or "/" in name or any(c.isspace() for c in name):
            raise ConfigError(f"{name!r} is not an interface name", key="track_interface")
        if names.count(name) > 1:
            raise ConfigError(f"{name} is listed more than once", key="track_interface")
    return tuple(names)


# ------------------------------------------------------------------ host checks


def check_account(user: str, allow_root: bool) -> pwd.struct_passwd:
    """The check user's account; refused when missing, or root without permission."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"user {user!r} does not exist; create it: {CREATE_USER} {user}", key="check_user"
        ) from None
    if account.pw_uid == 0 and not allow_root:
        raise ConfigError(
            f"{user!r} is root: exec checks would run with every right; use "
            f"an unprivileged user ({CREATE_USER} {CHECK_USER}) or set "
            "check_allow_root = true",
            key="check_user",
        )
    return account


def _writable_by_others(st: os.stat_result) -> str | None:
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # A sticky directory (like /tmp): nobody but root may rename or delete the
        # root-owned entries in it, so the path below it stays root's.
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return None
        who = "group" if st.st_mode & stat.S_IWGRP else "others"
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _executable_by(st: os.stat_result, account: pwd.struct_passwd) -> bool:
    if account.pw_uid == 0:
        return bool(st.st_mode & 0o111)
    if st.st_uid == account.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == account.pw_gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_script(key: str, program: str, account: pwd.struct_passwd) -> None:
    """Refuse a program that a user other than root could replace or change: the file
    and every directory above it (of the path as written and of its real path) must be
    owned by root and not group/other-writable; the file executable by the check user."""
    if not os.path.isabs(program):
        raise ConfigError(f"{program!r} is not an absolute path", key=key)
    real = os.path.realpath(program)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ConfigError(f"{program}: {exc.strerror}", key=key) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{program} is not a regular file", key=key)
    if not _executable_by(st, account):
        raise ConfigError(f"{program} is not executable by {account.pw_name}", key=key)
    problem = _writable_by_others(st)
    if problem:
        raise ConfigError(
            f"{program} {problem}: anyone who can change it runs code "
            "as the check user; make it root's, mode 0755",
            key=key,
        )
    dirs: list[str] = []
    for path in (program, real):
        parent = os.path.dirname(os.path.normpath(path))
        while True:
            if parent not in dirs:
                dirs.append(parent)
            if parent == "/":
                break
            parent = os.path.dirname(parent)
    for directory in dirs:
        try:
            st = os.stat(directory)
        except OSError as exc:
            raise ConfigError(f"{directory}: {exc.strerror}", key=key) from None
        problem = _writable_by_others(st)
        if problem:
            raise ConfigError(
                f"directory {directory} (above {program}) {problem}: the "
                "program could be replaced; use a directory only root can "
                "write",
                key=key,
            )


def check_exec_security(
    checks: tuple[CheckSpec, ...], agent: AgentSpec | None, user: str, allow_root: bool
) -> None:
    """Host checks of every exec check and agent (nothing to do without one)."""
    programs = [(f"check[{c.name}].exec", c.target) for c in checks if c.kind == "exec"]
    if agent is not None and agent.kind == "exec":
        programs.append(("agent.exec", agent.target))
    if not programs:
        return
    account = check_account(user, allow_root)
    for key, argv in programs:
        check_script(key, str(argv[0]), account)
