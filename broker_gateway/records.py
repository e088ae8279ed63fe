"""The agent registry's record: what the broker knows about one agent.

Stored as JSON in the JetStream KV bucket ``symbi_registry`` under the key
``<tier>.<id>``; written by the gateway and the launchers (router account),
read by the policy workers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_sdk.names import Level, Tier

AgentStatus = Literal["active", "revoked"]


class AgentRecord(BaseModel):
    """One registered agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tier: Tier
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    public_key: str = Field(
        pattern=r"^U[A-Z2-7]{55}$", description="NATS user public key (Ed25519)"
    )
    encryption_public_key: str = Field(description="X25519 public key, base64url without padding")
    clearance: Level = "restricted"
    capabilities: tuple[str, ...] = ()
    subscriptions: tuple[str, ...] = Field(
        default=(), description="event topic patterns (NATS wildcards * and >) it receives"
    )
    status: AgentStatus = "active"
    created_ms: int = 0
    revoked_ms: int | None = None

    @property
    def address(self) -> str:
        return f"{self.tier}.{self.id}"

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def key(self) -> str:
        """The registry key of this record."""
        return f"{self.tier}.{self.id}"
