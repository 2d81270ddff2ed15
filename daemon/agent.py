"""The load agent's answer and what it does to the node's weight (pure: no I/O).

Like HAProxy's agent-check, the agent answers one line of tokens separated by spaces
or commas, case-insensitive: ``NN%`` (capacity, 0..100), ``drain``, ``up``, ``down``;
other tokens are ignored, a line without any known token is a failed run. Tokens apply
in order: ``up`` ends both ``drain`` and ``down``.

The capacity scales the configured weight: effective weight = weight × capacity / 100
(at least 1 while the capacity is above 0; 0 at 0 %, which drains the node). Each
change moves slices, so two guards keep a noisy agent from churning the cluster:

* **hysteresis**: a new capacity less than ``HYSTERESIS_POINTS`` percentage points
  away from the one in force is ignored;
* **rate limit**: at most one change per ``RATE_LIMIT`` seconds.

Neither applies to a change to or from 0 %: taking a node out, and putting it back,
is immediate; so are ``drain``, ``down`` and ``up`` (they are reasons, not weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HYSTERESIS_POINTS = 10
"""Capacity changes smaller than this (in percentage points) are ignored."""
RATE_LIMIT = 5.0
"""Seconds between two weight changes at the least (not for changes to or from 0)."""
STATES = ("up", "drain", "down")
_PERCENT = re.compile(r"(\d{1,3})%")


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """What one line said: the capacity (None: not given) and the state words in order."""

    capacity: int | None
    words: tuple[str, ...]


def parse_agent_line(line: str) -> AgentAnswer | None:
    """``"up 50%"`` -> AgentAnswer(50, ("up",)); None when no token is known."""
    capacity: int | None = None
    words: list[str] = []
    for token in re.split(r"[\s,]+", line.strip().lower()):
        match = _PERCENT.fullmatch(token)
        if match and int(match.group(1)) <= 100:
            capacity = int(match.group(1))
        elif token in STATES:
            words.append(token)
    if capacity is None and not words:
        return None
    return AgentAnswer(capacity, tuple(words))


class LoadState:
    """The agent's word in force: capacity, drain, down; and the effective weight."""

    def __init__(self, weight: int) -> None:
        self.base = weight
        self.capacity = 100
        self.drain = False
        self.down = False
        self.last_change = float("-inf")

    @property
    def weight(self) -> int:
        if self.capacity == 0:
            return 0
        return max(1, round(self.base * self.capacity / 100))

    def apply(self, answer: AgentAnswer, now: float) -> bool:
        """Take ``answer`` in at ``now``; True when the effective weight changed."""
        for word in answer.words:
            if word == "up":
                self.drain = self.down = False
            elif word == "drain":
                self.drain = True
            else:
                self.down = True
        if answer.capacity is None or answer.capacity == self.capacity:
            return False
        if answer.capacity != 0 and self.capacity != 0:
            if abs(answer.capacity - self.capacity) < HYSTERESIS_POINTS:
                return False
            if now - self.last_change < RATE_LIMIT:
                return False  # the agent says it again next interval; taken then
        before = self.weight
        self.capacity = answer.capacity
        self.last_change = now
        return self.weight != before

    def set_base(self, weight: int) -> bool:
        """A new configured weight (reload); True when the effective weight changed."""
        before = self.weight
        self.base = weight
        return self.weight != before
