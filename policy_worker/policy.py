"""Communication policies: the YAML format, its validation and its compiled form.

A policy file lists one policy per (source tier, destination tier) pair::

    communication_policies:
      - name: docker_to_gvisor
        source_tier: docker
        destination_tier: gvisor          # or host, for host services
        allowed_message_types: [data, event, rpc]
        security_requirements:
          encryption_required: true       # every payload x25519-sealed
          encryption_min_level: confidential  # optional: only at this level and above
          signature_required: true        # only true is accepted: symbi/1 always signs
          audit_logging: true             # false spares allowed messages' records only
          content_filtering: true         # apply content_filter.rules
        rate_limits:                      # per sender; default 100/s, burst 200
          messages_per_second: 100
          burst_size: 200
        max_payload_bytes: 65536          # optional; larger payloads are malformed
        content_filter:                   # optional
          inspect_sealed: false
          rules:
            - {name: private_key, pattern: "-----BEGIN [A-Z ]*PRIVATE KEY-----"}
        required_capabilities: {data: [analytics]}   # optional, adds to the built-ins
        allow_senders: ["docker.*"]       # optional address globs (fnmatch)
        deny_senders: ["docker.untrusted-*"]
        allow_recipients: ["gvisor.*", "event.metrics.*"]
        deny_recipients: []

Whatever is read is validated by pydantic models with ``extra="forbid"``, and
a bad file raises :class:`~agent_sdk.errors.ConfigError` with one line naming
the file, the policy and the field. The models are then compiled into frozen
dataclasses (:class:`Policy`, :class:`PolicySet`) so that the decision path
touches no pydantic at all.

``signature_required`` exists for compatibility with the seed format: the
contract signs and verifies every message whatever a policy says, so
``false`` is rejected rather than silently ignored.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent_sdk.errors import ConfigError
from agent_sdk.names import LEVEL_RANK, TIERS, Level, MessageType, Tier
from policy_worker.content_filter import NO_FILTER, ContentFilter, FilterRule
from policy_worker.policy_yaml import describe_error, read_yaml

DestinationTier = Literal["docker", "gvisor", "firecracker", "host"]
HOST_TIER: Final = "host"
# What symbi/1 types require of every sender, whatever a policy adds.
BUILTIN_CAPABILITIES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"control": ("control",), "rpc": ("rpc",)}
)

_GLOB_CHARS: Final = frozenset("*?[")
_ADDRESS_GLOB_RE: Final = re.compile(r"^\*$|^[a-z0-9_*?\[\]!-]+(\.[a-z0-9_*?\[\]!-]+)+$")
_SENDER_HEADS: Final = frozenset(TIERS)
_RECIPIENT_HEADS: Final = frozenset((*TIERS, HOST_TIER, "event"))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecurityRequirements(_Model):
    encryption_required: bool = False
    encryption_min_level: Level | None = None
    signature_required: bool = True
    audit_logging: bool = True
    content_filtering: bool = False

    @field_validator("signature_required")
    @classmethod
    def _always_signed(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "must be true: symbi/1 signs and verifies every message (omit it or set true)"
            )
        return value


class RateLimits(_Model):
    messages_per_second: float = Field(gt=0, allow_inf_nan=False)
    burst_size: int = Field(ge=1)


class FilterRuleSpec(_Model):
    name: str = Field(min_length=1, max_length=64)
    pattern: str
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"bad regex {value!r}: {exc}") from exc
        return value


class ContentFilterSpec(_Model):
    rules: tuple[FilterRuleSpec, ...] = ()
    inspect_sealed: bool = False

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[FilterRuleSpec, ...]) -> tuple[FilterRuleSpec, ...]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"duplicate rule name {rule.name!r}")
            seen.add(rule.name)
        return rules


def _check_globs(values: tuple[str, ...] | None, heads: frozenset[str], allow: bool) -> None:
    if values is None:
        return
    if allow and not values:
        raise ValueError("must not be empty (omit the field to allow everyone)")
    for value in values:
        if not _ADDRESS_GLOB_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not an address or a glob such as 'docker.*'")
        head = value.partition(".")[0]
        if value != "*" and not _GLOB_CHARS & set(head) and head not in heads:
            raise ValueError(f"{value!r}: {head!r} is not one of {', '.join(sorted(heads))}")


class PolicySpec(_Model):
    """One policy as written in the file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str | None = None
    source_tier: Tier
    destination_tier: DestinationTier
    allowed_message_types: tuple[MessageType, ...] = Field(min_length=1)
    security_requirements: SecurityRequirements = SecurityRequirements()
    rate_limits: RateLimits = RateLimits(messages_per_second=100, burst_size=200)
    max_payload_bytes: int | None = Field(default=None, ge=1)
    content_filter: ContentFilterSpec | None = None
    required_capabilities: dict[MessageType, tuple[str, ...]] = {}
    allow_senders: tuple[str, ...] | None = None
    deny_senders: tuple[str, ...] | None = None
    allow_recipients: tuple[str, ...] | None = None
    deny_recipients: tuple[str, ...] | None = None

    @field_validator("allow_senders", "deny_senders")
    @classmethod
    def _sender_globs(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        _check_globs(value, _SENDER_HEADS, allow=info.field_name == "allow_senders")
        return value

    @field_validator("allow_recipients", "deny_recipients")
    @classmethod
    def _recipient_globs(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        _check_globs(value, _RECIPIENT_HEADS, allow=info.field_name == "allow_recipients")
        return value

    @field_validator("required_capabilities")
    @classmethod
    def _capability_names(
        cls, value: dict[MessageType, tuple[str, ...]]
    ) -> dict[MessageType, tuple[str, ...]]:
        for msg_type, caps in value.items():
            if any(not cap.strip() for cap in caps):
                raise ValueError(f"{msg_type}: capability names must not be empty")
        return value

    @model_validator(mode="after")
    def _filter_needs_filtering(self) -> PolicySpec:
        if self.content_filter is not None and not self.security_requirements.content_filtering:
            raise ValueError(
                "content_filter: its rules apply only with "
                "security_requirements.content_filtering: true"
            )
        return self


class PolicyDocument(_Model):
    """A whole policy file."""

    communication_policies: tuple[PolicySpec, ...]


@dataclass(frozen=True, slots=True)
class AddressMatcher:
    """A compiled list of addresses and fnmatch globs (``*`` also crosses dots)."""

    exact: frozenset[str]
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> AddressMatcher:
        patterns = tuple(patterns)
        globs = [p for p in patterns if _GLOB_CHARS & set(p)]
        exact = frozenset(p for p in patterns if p not in globs)
        regex = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None
        return cls(exact, regex)

    def matches(self, address: str) -> bool:
        return address in self.exact or (
            self.regex is not None and self.regex.match(address) is not None
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled policy: only plain values, ready for :func:`~policy_worker.decision.decide`.

    ``encryption_min_rank`` is the lowest ``LEVEL_RANK`` that must be sealed,
    or None when nothing must be; ``required_capabilities`` maps a message
    type to the capabilities its sender must hold (built-ins included).
    """

    name: str
    source_tier: Tier
    destination_tier: DestinationTier
    allowed_types: frozenset[str]
    rate: float
    burst: int
    audit_logging: bool = True
    encryption_min_rank: int | None = None
    content_filtering: bool = False
    content_filter: ContentFilter = NO_FILTER
    max_payload_bytes: int | None = None
    required_capabilities: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: BUILTIN_CAPABILITIES
    )
    allow_senders: AddressMatcher | None = None
    deny_senders: AddressMatcher | None = None
    allow_recipients: AddressMatcher | None = None
    deny_recipients: AddressMatcher | None = None

    @classmethod
    def from_spec(cls, spec: PolicySpec) -> Policy:
        sec = spec.security_requirements
        min_rank: int | None = None
        if sec.encryption_required:
            min_rank = 0
        elif sec.encryption_min_level is not None:
            min_rank = LEVEL_RANK[sec.encryption_min_level]
        caps = {t: tuple(dict.fromkeys(c)) for t, c in BUILTIN_CAPABILITIES.items()}
        for msg_type, extra in spec.required_capabilities.items():
            caps[msg_type] = tuple(dict.fromkeys((*caps.get(msg_type, ()), *extra)))
        cf = spec.content_filter
        content_filter = NO_FILTER
        if cf is not None:
            rules = tuple(
                FilterRule.compile(r.name, r.pattern, ignore_case=r.ignore_case) for r in cf.rules
            )
            content_filter = ContentFilter(rules, cf.inspect_sealed)

        def matcher(patterns: tuple[str, ...] | None) -> AddressMatcher | None:
            return None if patterns is None else AddressMatcher.compile(patterns)

        return cls(
            name=spec.name,
            source_tier=spec.source_tier,
            destination_tier=spec.destination_tier,
            allowed_types=frozenset(spec.allowed_message_types),
            rate=spec.rate_limits.messages_per_second,
            burst=spec.rate_limits.burst_size,
            audit_logging=sec.audit_logging,
            encryption_min_rank=min_rank,
            content_filtering=sec.content_filtering,
            content_filter=content_filter,
            max_payload_bytes=spec.max_payload_bytes,
            required_capabilities=MappingProxyType(caps),
            allow_senders=matcher(spec.allow_senders),
            deny_senders=matcher(spec.deny_senders),
            allow_recipients=matcher(spec.allow_recipients),
            deny_recipients=matcher(spec.deny_recipients),
        )


class PolicySet:
    """All policies of one file, looked up by (source tier, destination tier)."""

    __slots__ = ("_by_pair", "policies", "source")

    def __init__(self, policies: Iterable[Policy], source: str = "<policies>") -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)
        self.source = source
        by_name: dict[str, Policy] = {}
        by_pair: dict[tuple[str, str], Policy] = {}
        for policy in self.policies:
            where = f"{source}: policy {policy.name!r}"
            if policy.name in by_name:
                raise ConfigError(f"{where}: name: used by two policies")
            pair = (policy.source_tier, policy.destination_tier)
            if pair in by_pair:
                raise ConfigError(
                    f"{where}: destination_tier: {pair[0]} -> {pair[1]} is already governed"
                    f" by policy {by_pair[pair].name!r}"
                )
            by_name[policy.name] = by_pair[pair] = policy
        self._by_pair: Mapping[tuple[str, str], Policy] = by_pair

    def lookup(self, src_tier: str, dst_tier: str) -> Policy | None:
        """The policy for messages from ``src_tier`` to ``dst_tier`` (a tier or ``host``)."""
        return self._by_pair.get((src_tier, dst_tier))

    def get(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)

    def __repr__(self) -> str:
        return f"PolicySet({self.source!r}, {len(self.policies)} policies)"


def parse_policies(text: str, source: str = "<policies>") -> PolicySet:
    """Validate and compile a policy file's text; ``source`` names it in errors."""
    data = read_yaml(text, source)
    try:
        document = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc, data, source, PolicyDocument)) from exc
    return PolicySet((Policy.from_spec(spec) for spec in document.communication_policies), source)


def load_policies(path: str | os.PathLike[str]) -> PolicySet:
    """Read, validate and compile the policy file at ``path``."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{os.fspath(path)}: cannot read the policy file: {detail}") from exc
    return parse_policies(text, source=os.fspath(path))


@functools.cache
def default_policies() -> PolicySet:
    """The built-in policies shipped as ``policy_worker/default_policies.yaml``."""
    text = resources.files("policy_worker").joinpath("default_policies.yaml").read_text("utf-8")
    return parse_policies(text, source="policy_worker/default_policies.yaml")
