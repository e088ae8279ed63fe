"""The agent side of symbi: the ``symbi/1`` envelope and an async client.

Depends only on nats-py, PyNaCl and nkeys, so it can go into any sandbox.
"""

from agent_sdk.circuit import CircuitBreakerConfig
from agent_sdk.client import AgentClient
from agent_sdk.consume import MessageStream
from agent_sdk.credentials import AgentConfig, Credentials, read_credentials
from agent_sdk.envelope import Envelope, build, parse, sign, signing_input, to_headers, verify
from agent_sdk.errors import (
    AgentExistsError,
    AgentNotFoundError,
    BrokerError,
    CircuitOpenError,
    ConfigError,
    ContractError,
    CryptoError,
    EnvelopeError,
    PublishError,
    RegistryError,
    RequestTimeoutError,
    SandboxError,
    SignatureError,
    SymbiError,
)
from agent_sdk.inbox import Message, SecurityEvent
from agent_sdk.names import AgentAddress, Destination
from agent_sdk.options import ClientOptions
from agent_sdk.retry import RetryPolicy
from agent_sdk.sealing import EncryptionKeyPair, open_sealed, seal
from agent_sdk.security import ClientStats
from agent_sdk.signing import Signer, Verifier

__all__ = [
    "AgentAddress",
    "AgentClient",
    "AgentConfig",
    "AgentExistsError",
    "AgentNotFoundError",
    "BrokerError",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "ClientOptions",
    "ClientStats",
    "ConfigError",
    "ContractError",
    "Credentials",
    "CryptoError",
    "Destination",
    "EncryptionKeyPair",
    "Envelope",
    "EnvelopeError",
    "Message",
    "MessageStream",
    "PublishError",
    "RegistryError",
    "RequestTimeoutError",
    "RetryPolicy",
    "SandboxError",
    "SecurityEvent",
    "SignatureError",
    "Signer",
    "SymbiError",
    "Verifier",
    "build",
    "open_sealed",
    "parse",
    "read_credentials",
    "seal",
    "sign",
    "signing_input",
    "to_headers",
    "verify",
]
