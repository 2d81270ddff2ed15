"""Timer profiles and core settings, with the safety inequality they must keep.

Every tunable of the core lives here, documented, with its default. The daemon's
TOML config maps onto these values (see daemon/config.py).

Failover bound (L1). A crashed node's last heartbeat reaches its peers at most one
network delay after it was sent; each peer declares it dead ``dead_after`` later,
adopts the new view and announces it at once; the barrier then needs one more
round of heartbeats (prompted, not periodic). So every slice of the dead node is
served again within

    dead_after + barrier_rounds * (prompt_gap + max_delay) + apply_time

which the simulator checks (bench/failover_sim.py measures it): about 0.71 s for
the default profile and 0.15 s for the fast one.

Safety inequality (S1 across a death). A node keeps its kernel lease only on
acknowledgements from a quorum, each anchored at the local send time of the
heartbeat acknowledged; a peer stops acknowledging ``dead_after`` after it last
heard the node. Hence a node's lease ends before any quorum of peers can agree
on a view without it, provided ``lease * (1 + skew) + apply_margin < dead_after *
(1 - skew)``. ``validate()`` enforces that with ``skew`` = 1 % and an
``apply_margin`` for the time between computing and installing a lease.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum

from lbd.protocol.errors import ConfigError
from lbd.protocol.params import FIELDS, PROTOCOL

CLOCK_SKEW = 0.01


class QuorumMode(Enum):
    MAJORITY = "majority"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Timers:
    """Durations in seconds."""

    interval: float = 0.100
    """Heartbeat period."""
    dead_after: float = 0.700
    """Silence after which a peer is declared dead (7 intervals: flap-free at 20 % loss)."""
    lease: float = 0.560
    """Longest a quorum's acknowledgement keeps this node's kernel lease alive."""
    join_holddown: float = 0.300
    """A new peer counts as a member only after being heard this long (no flapping)."""
    startup_wait: float = 1.400
    """A fresh node listens this long before it may form or join a view."""
    leave_timeout: float = 3.0
    """Graceful leave waits at most this long for peers to absorb the slices."""
    apply_margin: float = 0.050
    """Allowance for the delay between computing a lease and the kernel holding it."""

    @property
    def lease_refresh(self) -> float:
        """Renew the kernel lease once less than this remains of it.

        A kernel transaction per heartbeat is the daemon's largest steady cost, so
        the lease is renewed only every few steps. A renewed lease has about
        ``lease - interval`` left (its anchor, our newest acknowledged heartbeat,
        is about an interval old) and steps come once per interval: renew at the
        last step that still leaves at least a quarter lease (the stall the kernel
        rides out), with the threshold halfway between two steps so that jitter
        cannot move the renewal by a step. Default profile: every 3rd step, with
        ~160 ms left; fast: every 2nd, with ~40 ms left.
        """
        steps = math.floor((0.75 * self.lease - self.interval) / self.interval)
        if steps < 1:
            return self.lease  # too short a lease to skip a step: renew at every one
        return self.lease - (steps + 0.5) * self.interval

    @property
    def prompt_gap(self) -> float:
        """Minimum gap between two prompted (out-of-cycle) heartbeats."""
        return self.interval / 5

    def validate(self) -> Timers:
        # Each value first on its own: nan compares false with everything and inf
        # passes every lower bound, so either would slip through the inequalities
        # below (nan lease: no S1 check at all). An hour bounds what the kernel's
        # lease timeout and the event loop's timers are ever asked to hold.
        may_be_zero = ("join_holddown", "apply_margin")
        for name in (
            "interval",
            "dead_after",
            "lease",
            "join_holddown",
            "startup_wait",
            "leave_timeout",
            "apply_margin",
        ):
            value = getattr(self, name)
            key = f"timers.{name}"
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ConfigError(f"must be a finite number of seconds, not {value!r}", key=key)
            if value < 0 or (value == 0 and name not in may_be_zero):
                need = "0 or more" if name in may_be_zero else "more than 0"
                raise ConfigError(f"must be {need} seconds, not {value:g}", key=key)
            if value > 3600:
                raise ConfigError(f"must be at most 3600 seconds, not {value:g}", key=key)
        if not 0.001 <= self.interval <= 10:
            raise ConfigError("must be between 0.001 and 10 seconds", key="timers.interval")
        if self.dead_after < 3 * self.interval:
            raise ConfigError("must be at least 3 intervals", key="timers.dead_after")
        if self.lease <= self.interval:
            raise ConfigError("must be longer than one interval", key="timers.lease")
        if self.lease * (1 + CLOCK_SKEW) + self.apply_margin >= self.dead_after * (1 - CLOCK_SKEW):
            raise ConfigError(
                "is too long for timers.dead_after: need "
                "lease*1.01 + apply_margin < dead_after*0.99, or a dead node's lease "
                "could outlive its detection (S1)",
                key="timers.lease",
            )
        if self.join_holddown + 2 * self.interval >= self.dead_after:
            raise ConfigError(
                "+ 2 intervals must be shorter than timers.dead_after", key="timers.join_holddown"
            )
        if self.startup_wait < 2 * self.interval:
            raise ConfigError("must be at least 2 intervals", key="timers.startup_wait")
        return self


DEFAULT_TIMERS = Timers()
FAST_TIMERS = Timers(
    interval=0.020,
    dead_after=0.140,
    lease=0.100,
    join_holddown=0.060,
    startup_wait=0.300,
    leave_timeout=1.0,
    apply_margin=0.015,
)
PROFILES = {"default": DEFAULT_TIMERS, "fast": FAST_TIMERS}


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What every node of one cluster must agree on, plus this node's timers."""

    cluster: str = "lbd"
    buckets: int = 4096
    seed: int = 0x4C4244
    quorum: QuorumMode = QuorumMode.MAJORITY
    timers: Timers = field(default_factory=Timers)
    shared: tuple[tuple[str, str], ...] = ()
    """The daemon's agreed parameters beyond the core's own (``params.FIELDS``: VIPs,
    prefixes, balance, MAC mode), as (field, canonical text); absent ones count as ""."""
    bootstrap_expect: int = 1
    """A node that never agreed a view (no quorum base: a first start) forms the
    cluster's first view only with at least this many members. Not agreed: it
    matters only on a first start. The daemon's default is 2 (never alone)."""

    def validate(self) -> CoreConfig:
        # bool is an int subclass: True must not pass as one bucket.
        for key, value, low, high in (
            ("buckets", self.buckets, 1, 65536),
            ("seed", self.seed, 0, 2**32 - 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"must be an integer, not {value!r}", key=key)
            if not low <= value <= high:
                raise ConfigError(f"must be between {low} and {high}, not {value}", key=key)
        if not isinstance(self.cluster, str) or not self.cluster or len(self.cluster.encode()) > 64:
            raise ConfigError("name must be 1..64 bytes", key="cluster")
        if not isinstance(self.quorum, QuorumMode):
            raise ConfigError(f"must be a QuorumMode, not {self.quorum!r}", key="quorum")
        if not isinstance(self.timers, Timers):
            raise ConfigError(f"must be Timers, not {self.timers!r}", key="timers")
        self.timers.validate()
        return self

    def with_timers(self, timers: Timers) -> CoreConfig:
        return replace(self, timers=timers)

    def agreed_values(self) -> dict[str, str]:
        """Canonical text of every parameter the cluster must agree on (params.py)."""
        t = self.timers
        values = {name: "" for name in FIELDS}
        values.update(self.shared)
        values.update(
            {
                "protocol": PROTOCOL,
                "buckets": str(self.buckets),
                "seed": str(self.seed),
                "quorum": self.quorum.value,
                "timers": ",".join(
                    repr(float(v))
                    for v in (
                        t.interval,
                        t.dead_after,
                        t.lease,
                        t.join_holddown,
                        t.startup_wait,
                        t.leave_timeout,
                        t.apply_margin,
                    )
                ),
            }
        )
        return values
