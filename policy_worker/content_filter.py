"""The content filter: a policy's regular-expression rules over a payload's text.

Rules run on the payload decoded as UTF-8 with ``errors="replace"``: a payload
that is not valid UTF-8 is still inspected, each invalid byte becoming U+FFFD
(the replacement character), so text around binary junk cannot slip through
undecoded, and a rule such as ``\\ufffd`` can reject non-text payloads outright.

Rules are tried in order and the first that matches anywhere (``re.search``)
names the denial. Patterns are compiled once, when the policy file loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def payload_text(payload: bytes) -> str:
    """The text that rules see: ``payload`` as UTF-8, invalid bytes as U+FFFD."""
    return payload.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class FilterRule:
    """One named rule; it matches if ``regex`` is found anywhere in the text."""

    name: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, name: str, pattern: str, *, ignore_case: bool = False) -> FilterRule:
        """Compile ``pattern`` (Python syntax); raises :class:`re.error` if it is invalid."""
        return cls(name, re.compile(pattern, re.IGNORECASE if ignore_case else 0))


@dataclass(frozen=True, slots=True)
class ContentFilter:
    """A policy's rules, and whether sealed payloads may be opened for inspection.

    ``inspect_sealed`` says that senders on this path seal to the router's key,
    so that the worker can open a copy for filtering; without it a sealed
    payload cannot be inspected, and a policy with rules denies it.
    """

    rules: tuple[FilterRule, ...] = ()
    inspect_sealed: bool = False

    def first_match(self, payload: bytes) -> str | None:
        """The name of the first rule that matches ``payload``, or None if none does."""
        if not self.rules:
            return None
        text = payload_text(payload)
        for rule in self.rules:
            if rule.regex.search(text) is not None:
                return rule.name
        return None


NO_FILTER = ContentFilter()
