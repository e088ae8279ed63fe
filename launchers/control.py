"""Control messages to ``host.launcher``: what an agent may ask, and what it may not.

The payload is one JSON object (unknown fields are an error)::

    {"op": "launch", "tier": "gvisor", "id": "helper-1",
     "command": ["python3", "-c", "..."],            # required, argv of the agent
     "image": null, "backend": null,                 # default: the tier's own
     "env": {"KEY": "value"},                        # never a secret
     "clearance": "restricted", "capabilities": ["rpc"], "subscriptions": [],
     "limits": {"memory_mb": 256, "cpus": 0.5, "pids": 64}}
    {"op": "stop", "tier": "gvisor", "id": "helper-1", "timeout_s": 10}
    {"op": "status", "tier": "gvisor", "id": "helper-1"}

``tier`` is the tier of the agent to launch, stop or inspect, and defaults to
the requester's own; the launcher of that tier answers (:func:`responsible_tier`).

What a requester may do, beyond what the policy workers already checked:

- it holds the ``control`` capability, whatever the message type;
- ``launch``: the new agent's tier is at least as isolated as the requester's
  (docker < gvisor < firecracker), its clearance at most the requester's, its
  capabilities a subset of the requester's; ``image`` is one the service
  allows (by default only the agent image), ``backend`` never ``process``;
  limits within the service's maxima; at most ``max_per_owner`` sandboxes
  of one requester on this host. The requester becomes the sandbox's owner.
- ``stop`` and ``status``: only the owner, or the agent itself.

There is no way to name a host path (no ``--app`` or ``--rootfs``): an agent
passes its program as ``command``, or uses an allowed image that holds it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from agent_sdk.errors import ContractError, SandboxError
from agent_sdk.names import AGENT_ID_RE, LEVEL_RANK, TIERS, Level, Tier
from agent_sdk.topics import check_pattern
from broker_gateway.records import AgentRecord
from broker_gateway.registration import RESERVED_IDS
from launchers.backend import BackendName, Limits, Sandbox
from launchers.launch import LaunchRequest
from launchers.paths import DEFAULT_IMAGE
from launchers.selection import TIER_MINIMUM, choose_backend

ErrorCode = Literal["invalid", "forbidden", "not_found", "failed", "expired"]
CONTROL_CAPABILITY: Final = "control"
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MAX_ARG: Final = 8192


class Refused(SandboxError):
    """A control message that the launcher will not carry out, and why (``code``)."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code: ErrorCode = code


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsIn(_Model):
    memory_mb: int = Limits.memory_mb
    cpus: float = Limits.cpus
    pids: int = Limits.pids


class _Op(_Model):
    tier: Tier | None = None
    id: str = Field(pattern=AGENT_ID_RE.pattern)


class LaunchOp(_Op):
    op: Literal["launch"]
    command: tuple[str, ...] = Field(min_length=1, max_length=64)
    image: str | None = Field(default=None, max_length=255)
    backend: BackendName | None = None
    env: dict[str, str] = Field(default_factory=dict, max_length=64)
    clearance: Level = "restricted"
    capabilities: tuple[str, ...] = Field(default=(), max_length=16)
    subscriptions: tuple[str, ...] = Field(default=(), max_length=32)
    limits: LimitsIn = Field(default_factory=LimitsIn)

    @field_validator("command")
    @classmethod
    def _command(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value[0] or any("\0" in a or len(a) > _MAX_ARG for a in value):
            raise ValueError("a non-empty program, arguments without NUL, 8 KiB at most each")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not _ENV_NAME_RE.fullmatch(key) or "\0" in text or len(text) > _MAX_ARG:
                raise ValueError(f"bad environment variable {key[:64]!r}")
        return value

    @field_validator("subscriptions")
    @classmethod
    def _subscriptions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return tuple(check_pattern(p) for p in value)
        except ContractError as exc:
            raise ValueError(str(exc)) from exc


class StopOp(_Op):
    op: Literal["stop"]
    timeout_s: float = Field(default=10.0, ge=0, le=60)


class StatusOp(_Op):
    op: Literal["status"]


ControlOp = Annotated[LaunchOp | StopOp | StatusOp, Field(discriminator="op")]
_OPS: Final = TypeAdapter(ControlOp)


def parse_op(payload: bytes) -> LaunchOp | StopOp | StatusOp:
    """The request in ``payload``; :class:`Refused` (``invalid``) saying what is wrong."""
    try:
        return _OPS.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise Refused("invalid", f"{where}: {first['msg']}") from exc


def responsible_tier(payload: bytes, sender_tier: Tier) -> Tier:
    """The tier whose launcher handles ``payload``: its ``tier``, else the sender's.

    Exactly one tier's launchers answer each request, even a malformed one
    (which the sender's own tier answers), and the others leave it alone.
    """
    try:
        body = json.loads(payload)
    except ValueError:
        return sender_tier
    tier = body.get("tier") if isinstance(body, dict) else None
    for known in TIERS:
        if tier == known:
            return known
    return sender_tier


@dataclass(frozen=True)
class ServicePolicy:
    """What a launcher service allows its requesters; set on its command line."""

    images: tuple[str, ...] = (DEFAULT_IMAGE,)
    max_limits: Limits = field(default_factory=lambda: Limits(memory_mb=1024, cpus=2.0, pids=512))
    max_per_owner: int = 8
    #: A request older than this (by its ``Symbi-Time``) is answered ``expired``:
    #: after a launcher outage, a backlog of launches is never carried out.
    max_age_s: float = 120.0


def require_control(requester: AgentRecord) -> None:
    if CONTROL_CAPABILITY not in requester.capabilities:
        raise Refused("forbidden", f"{requester.address} lacks the control capability")


def launch_request(
    op: LaunchOp, tier: Tier, requester: AgentRecord, policy: ServicePolicy, owned: int
) -> LaunchRequest:
    """The launch that ``op`` asks for, if ``requester`` may ask it; else :class:`Refused`."""
    if op.id in RESERVED_IDS:
        raise Refused("forbidden", f"agent id {op.id!r} is reserved for symbi's own services")
    if TIER_MINIMUM[tier] < TIER_MINIMUM[requester.tier]:
        raise Refused("forbidden", f"a {requester.tier} agent may not launch into the {tier} tier")
    if LEVEL_RANK[op.clearance] > LEVEL_RANK[requester.clearance]:
        raise Refused("forbidden", f"clearance {op.clearance} is above the requester's")
    extra = set(op.capabilities) - set(requester.capabilities)
    if extra:
        raise Refused("forbidden", f"capabilities the requester lacks: {', '.join(sorted(extra))}")
    if op.image is not None and op.image not in policy.images:
        raise Refused("forbidden", f"image {op.image!r} is not allowed by this launcher")
    most = policy.max_limits
    asked = op.limits
    if asked.memory_mb > most.memory_mb or asked.cpus > most.cpus or asked.pids > most.pids:
        raise Refused(
            "forbidden",
            f"limits above the maximum ({most.memory_mb} MiB, {most.cpus} cpus, {most.pids} pids)",
        )
    if owned >= policy.max_per_owner:
        raise Refused("forbidden", f"{requester.address} already runs {owned} sandboxes here")
    try:
        backend = choose_backend(tier, op.backend)
        limits = Limits(memory_mb=asked.memory_mb, cpus=asked.cpus, pids=asked.pids)
    except SandboxError as exc:
        raise Refused("invalid", str(exc)) from exc
    if op.image is not None and backend not in ("docker", "gvisor"):
        raise Refused("invalid", f"image is for the docker and gvisor backends, not {backend}")
    return LaunchRequest(
        tier=tier,
        agent_id=op.id,
        command=op.command,
        backend=backend,
        image=op.image,
        env=dict(op.env),
        limits=limits,
        clearance=op.clearance,
        capabilities=op.capabilities,
        subscriptions=op.subscriptions,
        owner=requester.address,
    )


def check_owner(sandbox: Sandbox, requester: AgentRecord) -> None:
    """``stop`` and ``status``: the owner of the sandbox, or the agent in it."""
    if requester.address not in (sandbox.owner, f"{sandbox.tier}.{sandbox.agent_id}"):
        raise Refused("forbidden", f"{requester.address} did not launch {sandbox.name}")
