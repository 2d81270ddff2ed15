"""Is this node's service healthy, and how much load can it take? (L3)

Theory of operation
-------------------
:class:`HealthMonitor` runs, as asyncio tasks of the daemon's loop:

* every ``[[check]]`` (daemon/checks.py: http, tcp or exec), each on its own schedule
  (``checks.repeat``: never overlapping itself), every run bounded by its timeout;
  a check's state moves by rise/fall (``checks.RiseFall``) and starts unhealthy, so a
  node serves only once every check has passed ``rise`` times in a row;
* ``track_interface``: each interface is read from /sys every ``INTERFACE_POLL``
  seconds (IFF_UP and carrier; a missing interface is down), no rise/fall;
* the ``[agent]`` (tcp: one line from a socket; exec: the program's first line of
  stdout), its answer applied by ``agent.LoadState`` (hysteresis, rate limit). A
  failing agent changes nothing: its last word stays in force, status shows why.

What the daemon reads:

* ``reasons``: why the node is unhealthy, e.g. ``{"check web", "interface eth1",
  "agent down"}``; empty means healthy (``healthy``). The daemon drains while any holds.
* ``drain_reasons``: ``{"agent"}`` while the agent says ``drain`` or 0 %.
* ``weight``: the effective weight (configured weight × the agent's capacity).
* ``status()``: one dict per check, interface and the agent, for ``lbd-cli status``.

Callbacks, run on the loop (an exception in one goes to the loop's exception handler,
the checks go on): ``on_change(subject, healthy, detail)`` on every transition, where
``subject`` is the reason's text ("check web", "interface eth1", "agent") and
``detail`` the last result and the program's output; ``on_weight(weight)`` when the
effective weight changes; ``on_drain(draining, detail)`` when ``drain_reasons`` goes
from empty to not or back.
"""

from __future__ import annotations

import asyncio
import pwd
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lbd.daemon import checks
from lbd.daemon.agent import HYSTERESIS_POINTS, RATE_LIMIT, LoadState, parse_agent_line
from lbd.daemon.checks import Result, RiseFall
from lbd.daemon.config import DaemonConfig
from lbd.daemon.healthconfig import AgentSpec, CheckSpec
from lbd.protocol.errors import LbdError

INTERFACE_POLL = 1.0
"""Seconds between two reads of a tracked interface's state."""
__all__ = ["HYSTERESIS_POINTS", "RATE_LIMIT", "HealthMonitor", "Result", "describe"]
STOP_TIMEOUT = 3.0
"""stop() waits at most this long for the runs to end (each reaps its program)."""

ChangeCallback = Callable[[str, bool, str], None]
WeightCallback = Callable[[int], None]
DrainCallback = Callable[[bool, str], None]


@dataclass(slots=True)
class _Run:
    """What status shows of one check, interface or the agent."""

    kind: str
    last: Result | None = None
    since: float = 0.0

    def row(self, name: str, state: str) -> dict[str, Any]:
        last = self.last
        return {
            "name": name,
            "kind": self.kind,
            "state": state,
            "result": None if last is None else ("pass" if last.ok else "fail"),
            "reason": "" if last is None else last.reason,
            "latency_ms": None if last is None else round(last.latency * 1000, 1),
            "output": "" if last is None else last.output,
            "since": self.since,
        }


def describe(result: Result) -> str:
    """A result for the journal: the reason, then the output if there is any."""
    return f"{result.reason}: {result.output}" if result.output else result.reason


class HealthMonitor:
    """The checks, tracked interfaces and the load agent of one daemon (module doc)."""

    def __init__(
        self,
        cfg: DaemonConfig,
        *,
        on_change: ChangeCallback | None = None,
        on_weight: WeightCallback | None = None,
        on_drain: DrainCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        sysfs: str = checks.SYSFS_NET,
    ) -> None:
        self.cfg = cfg
        self._on_change, self._on_weight, self._on_drain = on_change, on_weight, on_drain
        self._clock = clock
        self._sysfs = sysfs
        now = clock()
        self._checks = {
            s.name: (s, RiseFall(s.rise, s.fall, now), _Run(s.kind, since=now)) for s in cfg.checks
        }
        self._links = {name: _Run("interface", since=now) for name in cfg.track_interface}
        self._up = dict.fromkeys(cfg.track_interface, False)
        self._load = LoadState(cfg.weight)
        self._agent_run = _Run(f"agent {cfg.agent.kind}", since=now) if cfg.agent else None
        self._tasks: list[asyncio.Task[None]] = []
        self._account: pwd.struct_passwd | None = None
        self._started = False

    # ------------------------------------------------------------ what the daemon reads

    @property
    def reasons(self) -> frozenset[str]:
        found = {
            f"check {name}" for name, (_, state, _) in self._checks.items() if not state.healthy
        }
        found |= {f"interface {name}" for name, up in self._up.items() if not up}
        if self._load.down:
            found.add("agent down")
        return frozenset(found)

    @property
    def drain_reasons(self) -> frozenset[str]:
        return frozenset({"agent"}) if self._load.drain or self._load.weight == 0 else frozenset()

    @property
    def healthy(self) -> bool:
        return not self.reasons

    @property
    def weight(self) -> int:
        return self._load.weight

    def set_weight(self, weight: int) -> None:
        """The configured weight changed (reload): on_weight if the effective one moves."""
        if self._load.set_base(weight):
            self._emit_weight()

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name, (spec, state, run) in self._checks.items():
            row = run.row(name, "healthy" if state.healthy else "unhealthy")
            row.update(passes=state.passes, fails=state.fails, rise=spec.rise, fall=spec.fall)
            rows.append(row)
        for name, run in self._links.items():
            rows.append(run.row(name, "up" if self._up[name] else "down"))
        if self._agent_run is not None:
            load = self._load
            said = "down" if load.down else "drain" if load.drain else "up"
            row = self._agent_run.row("agent", said)
            row.update(capacity=load.capacity, weight=load.weight)
            rows.append(row)
        return rows

    # ------------------------------------------------------------ running

    async def start(self) -> None:
        """Read the interfaces once (reasons are right at once), start every task."""
        if self._started:
            return
        self._started = True
        if any(s.kind == "exec" for s in self.cfg.checks) or (
            self.cfg.agent is not None and self.cfg.agent.kind == "exec"
        ):
            try:  # refused at load time if missing; gone since: the runs fail, saying so
                self._account = pwd.getpwnam(self.cfg.check_user)
            except KeyError:
                self._account = None
        self._poll_links()
        for spec, _, _ in self._checks.values():
            self._spawn(spec.interval, self._check_run(spec))
        if self._links:
            self._spawn(INTERFACE_POLL, self._links_run)
        if self.cfg.agent is not None:
            self._spawn(self.cfg.agent.interval, self._agent_runner(self.cfg.agent))

    async def stop(self) -> None:
        """Cancel every run and wait (at most ``STOP_TIMEOUT``) until each has killed
        and reaped its program."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

    def _spawn(self, interval: float, run: Callable[[], Awaitable[object]]) -> None:
        self._tasks.append(asyncio.create_task(checks.repeat(interval, run)))

    def _call(self, callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as exc:  # the checks must go on
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"health callback {callback!r} failed", "exception": exc}
            )

    async def _guarded(self, probe: Callable[[], Awaitable[Result]]) -> Result:
        try:
            return await probe()
        except Exception as exc:  # a bug here must fail the check, not stop it
            return Result(False, f"internal error: {exc!r}", 0.0)

    def _check_run(self, spec: CheckSpec) -> Callable[[], Awaitable[None]]:
        def probe() -> Awaitable[Result]:
            account = self._account
            if spec.kind == "exec" and account is None:
                return _failed(f"check user {self.cfg.check_user!r} does not exist")
            return checks.probe_for(spec.kind, spec.target, spec.timeout, spec.name, account)()

        async def run() -> None:
            self.record(spec.name, await self._guarded(probe))

        return run

    def record(self, name: str, result: Result) -> None:
        """One result of check ``name`` (the runs call it; tests may too)."""
        _, state, run = self._checks[name]
        run.last = result
        now = self._clock()
        if state.feed(result.ok, now):
            run.since = now
            self._call(self._on_change, f"check {name}", state.healthy, describe(result))

    async def _links_run(self) -> None:
        self._poll_links()

    def _poll_links(self) -> None:
        for name, run in self._links.items():
            up, why = checks.interface_state(name, self._sysfs)
            first = run.last is None
            run.last = Result(up, why, 0.0)
            if up != self._up[name]:
                self._up[name] = up
                run.since = self._clock()
                if not first or up:  # starting down is no change (it was never up)
                    self._call(self._on_change, f"interface {name}", up, why)

    def _agent_runner(self, spec: AgentSpec) -> Callable[[], Awaitable[None]]:
        def probe() -> Awaitable[Result]:
            if isinstance(spec.target, str):  # tcp
                return checks.bounded(spec.timeout, checks.read_line_tcp(spec.target))
            if self._account is None:
                return _failed(f"check user {self.cfg.check_user!r} does not exist")
            return checks.run_exec(spec.target, spec.timeout, "agent", self._account, stderr=False)

        async def run() -> None:
            self.agent_result(await self._guarded(probe))

        return run

    def agent_result(self, result: Result) -> None:
        """One run of the agent: its answer applied if it passed and says something."""
        run = self._agent_run
        if run is None:
            raise LbdError("no [agent] is configured")
        answer = None
        if result.ok:
            line = result.output.splitlines()[0] if result.output else ""
            answer = parse_agent_line(line)
            if answer is None:
                result = Result(
                    False, f"no usable answer in {line[:64]!r}", result.latency, result.output
                )
        run.last = result
        if answer is None:
            return  # a failing agent changes nothing
        now = self._clock()
        down, drain = self._load.down, bool(self.drain_reasons)
        if self._load.apply(answer, now):
            run.since = now
            self._emit_weight()
        if self._load.down != down:
            run.since = now
            self._call(
                self._on_change,
                "agent",
                not self._load.down,
                f"agent says {'down' if self._load.down else 'up'}",
            )
        if bool(self.drain_reasons) != drain:
            run.since = now
            self._call(self._on_drain, not drain, f"agent says {result.output!r}")

    def _emit_weight(self) -> None:
        self._call(self._on_weight, self._load.weight)


async def _failed(reason: str) -> Result:
    return Result(False, reason, 0.0)
