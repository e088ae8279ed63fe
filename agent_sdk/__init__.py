"""The agent side of symbi: the ``symbi/1`` envelope and an async client.

Depends only on nats-py, PyNaCl and nkeys, so it can go into any sandbox.
"""

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
from agent_sdk.names import AgentAddress, Destination
from agent_sdk.sealing import EncryptionKeyPair, open_sealed, seal
from agent_sdk.signing import Signer, Verifier

__all__ = [
    "AgentAddress",
    "AgentExistsError",
    "AgentNotFoundError",
    "BrokerError",
    "CircuitOpenError",
    "ConfigError",
    "ContractError",
    "CryptoError",
    "Destination",
    "EncryptionKeyPair",
    "Envelope",
    "EnvelopeError",
    "PublishError",
    "RegistryError",
    "RequestTimeoutError",
    "SandboxError",
    "SignatureError",
    "Signer",
    "SymbiError",
    "Verifier",
    "build",
    "open_sealed",
    "parse",
    "seal",
    "sign",
    "signing_input",
    "to_headers",
    "verify",
]
