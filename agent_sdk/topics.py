"""Event subscriptions: topic patterns and the requests to the bus service that change them.

An agent cannot subscribe to event subjects itself (its credentials allow its
own inbox only); it asks the ``host.bus`` service, with an ordinary signed
``data`` message, to deliver matching events to its inbox. Patterns are
checked here so that a typo fails at the caller, not as a silent no-op.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final, Literal

from agent_sdk.errors import ContractError
from agent_sdk.names import MAX_TOPIC_TOKENS

BUS_SERVICE: Final = "host.bus"
_TOKEN_RE: Final = re.compile(r"[a-z0-9_-]+|\*")


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is 1-8 tokens of ``[a-z0-9_-]+`` or ``*``, the last maybe ``>``."""
    tokens = pattern.split(".")
    body = tokens[:-1] if tokens[-1] == ">" else tokens
    if not 1 <= len(tokens) <= MAX_TOPIC_TOKENS or not all(_TOKEN_RE.fullmatch(t) for t in body):
        raise ContractError(f"invalid topic pattern {pattern!r}")
    return pattern


def bus_request(op: Literal["subscribe", "unsubscribe"], patterns: Iterable[str]) -> bytes:
    """The payload of a (un)subscribe request to :data:`BUS_SERVICE`."""
    topics = [check_pattern(p) for p in patterns]
    if not topics:
        raise ContractError(f"{op}: give at least one topic pattern")
    return json.dumps({"op": op, "topics": topics}).encode()
