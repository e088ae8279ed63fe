"""The host side of the bus: NATS in operator mode, accounts, credentials, registry."""

from broker_gateway.gateway import AgentCredentials, Gateway
from broker_gateway.records import AgentRecord
from broker_gateway.registry import Registry, RegistryCache
from broker_gateway.runtime import Runtime, RuntimeConfig
from broker_gateway.state import StateDir
from broker_gateway.streams import StreamSettings

__all__ = [
    "AgentCredentials",
    "AgentRecord",
    "Gateway",
    "Registry",
    "RegistryCache",
    "Runtime",
    "RuntimeConfig",
    "StateDir",
    "StreamSettings",
]
