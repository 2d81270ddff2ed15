"""Between the health monitor and the node: drain while unhealthy, say why, tell peers.

Theory of operation
-------------------
``HealthMonitor`` (health.py) knows whether this node's service is healthy; this
module turns that into the node's behaviour:

* **Unhealthy drains.** While any reason holds (a check failing, a tracked
  interface down, the agent saying ``down``) the node holds the drain reason
  ``health``: it gives up all its slices through the normal handoff (no new
  connections, established ones kept) and takes them back once healthy. Drain
  reasons are a set (service.py), so ``lbd-cli undrain`` never overrides a failing
  check and a recovering check never ends an operator's drain. The agent's
  ``drain`` (or 0 %) is the drain reason ``agent``; its capacity becomes the
  node's weight.
* **A node starts unhealthy** (every check must pass ``rise`` times first), so it
  holds ``health`` from its first step and claims nothing before its service has
  proved itself.
* **Peers know.** The node's heartbeats carry why it is unhealthy
  (``messages.HEALTH_*``); ``lbd-cli members`` shows every member's health.
* **Every node unhealthy.** Draining them all would refuse the whole VIP, often
  for a shared cause (a database behind every node). With ``all_unhealthy =
  "serve"`` (the default) a node that has been healthy since it started, and now
  hears every member of its view say it is unhealthy too, keeps (or takes back)
  its slices, with one journal ERR (``EveryNodeUnhealthy``) and a PROBLEM line;
  as soon as one member is healthy again the others drain. ``"close"`` drains
  regardless. A node whose checks never passed never serves.

Every transition is one journal line: ``CheckFailed`` (with the result and the
program's output), ``CheckRecovered``, ``EveryNodeUnhealthy``, ``WeightChanged``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from lbd.daemon.health import HealthMonitor
from lbd.daemon.notify import ERR, INFO, NOTICE, WARNING
from lbd.protocol.messages import HEALTH_AGENT, HEALTH_CHECK, HEALTH_INTERFACE

if TYPE_CHECKING:
    from lbd.daemon.service import Service

HEALTH_REASON = "health"
AGENT_REASON = "agent"
_FLAGS = (("check ", HEALTH_CHECK), ("interface ", HEALTH_INTERFACE), ("agent down", HEALTH_AGENT))


def health_flags(reasons: frozenset[str]) -> int:
    """The ``HEALTH_*`` flags of the monitor's reasons ("check web", ...)."""
    flags = 0
    for reason in reasons:
        for prefix, flag in _FLAGS:
            if reason.startswith(prefix):
                flags |= flag
    return flags


def wanted(svc: Service) -> bool:
    cfg = svc.config
    return bool(cfg.checks or cfg.track_interface or cfg.agent is not None)


class HealthLink:
    """The monitor of one daemon, wired to its drain reasons, weight and heartbeats."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.monitor = HealthMonitor(
            svc.config, on_change=self._changed, on_weight=self._weight, on_drain=self._agent_drain
        )
        self.proven = False
        """Healthy at least once since start: only then may it serve while unhealthy."""
        self.serving_anyway = False
        self._updating = False

    async def start(self) -> None:
        self.update("starting: checks have not passed yet")  # closed from the first step
        await self.monitor.start()
        self.update("checks started")

    async def stop(self) -> None:
        await self.monitor.stop()

    # ------------------------------------------------------------ monitor callbacks

    def _changed(self, subject: str, healthy: bool, detail: str) -> None:
        if healthy:
            self.svc.sink.emit(
                NOTICE, f"{subject} recovered ({detail})", "CheckRecovered", {"SUBJECT": subject}
            )
        else:
            self.svc.sink.emit(
                WARNING,
                f"{subject} failed: {detail}",
                "CheckFailed",
                {"SUBJECT": subject, "DETAIL": detail},
            )
        self.update(f"{subject} {'recovered' if healthy else 'failed'}")

    def _weight(self, weight: int) -> None:
        if weight < 1:
            return  # 0 % is the drain reason "agent" (_agent_drain), not a weight
        self.svc.sink.emit(
            INFO, f"agent: effective weight {weight}", "WeightChanged", {"WEIGHT": str(weight)}
        )
        self.svc.core.set_weight(weight, time.monotonic())
        self.svc._process()

    def _agent_drain(self, draining: bool, detail: str) -> None:
        self.svc.set_draining(draining, f"agent: {detail}", reason=AGENT_REASON)

    # ------------------------------------------------------------ the node

    def update(self, why: str) -> None:
        """Tell the core and drain for health, unless every member is unhealthy."""
        if self._updating:
            return
        self._updating = True
        try:
            svc, core = self.svc, self.svc.core
            reasons = self.monitor.reasons
            flags = health_flags(reasons)
            if not flags:
                self.proven = True
            if flags != core.health:
                core.set_health(flags, time.monotonic())
                svc._process()
            anyway = (
                bool(flags)
                and self.proven
                and svc.config.all_unhealthy == "serve"
                and core.every_member_unhealthy()
            )
            if anyway != self.serving_anyway:
                self.serving_anyway = anyway
                if anyway:
                    svc.sink.emit(
                        ERR,
                        "every node of the view is unhealthy: serving anyway "
                        "rather than refusing the whole VIP (all_unhealthy = "
                        f'"serve"); here: {", ".join(sorted(reasons))}',
                        "EveryNodeUnhealthy",
                    )
                else:
                    svc.sink.emit(
                        NOTICE, "not every node is unhealthy any more", "EveryNodeUnhealthy"
                    )
            text = ", ".join(sorted(reasons)) or why
            svc.set_draining(bool(flags) and not anyway, text, reason=HEALTH_REASON)
        finally:
            self._updating = False

    def after_step(self) -> None:
        """Peers' health changes with their heartbeats: re-judge only while unhealthy."""
        if self.svc.core.health or self.serving_anyway:
            self.update("peers' health changed")

    def problems(self) -> list[str]:
        if self.serving_anyway:
            return ['every node is unhealthy: serving anyway (all_unhealthy = "serve")']
        if self.monitor.reasons:
            return [f"unhealthy, not serving: {', '.join(sorted(self.monitor.reasons))}"]
        return []

    def status(self) -> dict[str, Any]:
        return {
            "healthy": self.monitor.healthy,
            "reasons": sorted(self.monitor.reasons),
            "serving_anyway": self.serving_anyway,
            "weight": self.monitor.weight,
            "checks": self.monitor.status(),
        }
