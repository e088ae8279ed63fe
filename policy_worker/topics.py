"""Event topic patterns: what an agent's ``subscriptions`` may hold, and matching.

A pattern is a topic (one to eight dot-separated ``[a-z0-9_-]+`` tokens) in
which whole tokens may be NATS wildcards: ``*`` matches exactly one token and
``>``, only as the last token, matches one or more. ``metrics.*`` matches
``metrics.cpu`` but not ``metrics`` or ``metrics.cpu.load``; ``metrics.>``
matches the last two.
"""

from __future__ import annotations

import functools
from typing import Final

from agent_sdk.errors import EnvelopeError
from agent_sdk.names import MAX_TOPIC_TOKENS, TOPIC_TOKEN_RE

MAX_PATTERN_CHARS: Final = 255


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else :class:`EnvelopeError`."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        raise EnvelopeError("a topic pattern must be a string of at most 255 characters")
    tokens = pattern.split(".")
    if not 1 <= len(tokens) <= MAX_TOPIC_TOKENS:
        raise EnvelopeError(f"topic pattern {pattern!r}: 1 to {MAX_TOPIC_TOKENS} tokens")
    for i, token in enumerate(tokens):
        if token == ">" and i != len(tokens) - 1:
            raise EnvelopeError(f"topic pattern {pattern!r}: '>' may only be the last token")
        if token not in ("*", ">") and not TOPIC_TOKEN_RE.fullmatch(token):
            raise EnvelopeError(
                f"topic pattern {pattern!r}: each token is [a-z0-9_-]+, '*' or a final '>'"
            )
    return pattern


@functools.lru_cache(maxsize=65_536)
def pattern_matches(pattern: str, topic: str) -> bool:
    """Whether subscription ``pattern`` matches event ``topic`` (cached: both recur)."""
    want = pattern.split(".")
    have = topic.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
