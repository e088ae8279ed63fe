"""Every error that symbi-runtime raises derives from :class:`SymbiError`.

The tree (lower-level nats, OS, Docker and crypto errors are mapped at the
boundary with ``raise ... from exc``)::

    SymbiError
    ├── ConfigError            bad configuration, policy file or state directory
    ├── ContractError          something does not follow the wire contract symbi/1
    │   ├── EnvelopeError      a header is missing or malformed       (reason: malformed)
    │   └── SignatureError     unsigned or bad signature   (reason: unsigned / bad_signature)
    ├── CryptoError            a sealed payload cannot be opened
    ├── RegistryError          registry lookups and writes
    │   ├── AgentExistsError   the id is already registered in that tier
    │   └── AgentNotFoundError no such agent
    ├── BrokerError            the NATS server or JetStream failed or refused
    │   └── PublishError       a publish was not acknowledged
    │       └── CircuitOpenError  the client stopped trying after repeated failures
    ├── RequestTimeoutError    an rpc request got no answer in time
    └── SandboxError           a launcher could not start, stop or inspect a sandbox
"""

from __future__ import annotations


class SymbiError(Exception):
    """Root of every error raised by symbi-runtime."""


class ConfigError(SymbiError):
    """A configuration value, policy file or state directory is unusable."""


class ContractError(SymbiError):
    """Something does not follow the wire contract; ``reason`` is the contract's code."""

    reason: str = "malformed"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class EnvelopeError(ContractError):
    """A header is missing, malformed or too large."""

    reason = "malformed"


class SignatureError(ContractError):
    """The signature is missing (``unsigned``) or does not verify (``bad_signature``)."""

    reason = "bad_signature"


class CryptoError(SymbiError):
    """A sealed payload cannot be opened with the given key."""


class RegistryError(SymbiError):
    """The agent registry refused or failed an operation."""


class AgentExistsError(RegistryError):
    """An agent with that id is already registered in that tier."""


class AgentNotFoundError(RegistryError):
    """No agent with that address is registered."""


class BrokerError(SymbiError):
    """The NATS server or JetStream failed or refused an operation."""


class PublishError(BrokerError):
    """A publish was not acknowledged by the stream that should store it."""


class CircuitOpenError(PublishError):
    """Publishing stopped after repeated failures; it resumes after a cool-down."""


class RequestTimeoutError(SymbiError):
    """An rpc request got no answer within its timeout."""


class SandboxError(SymbiError):
    """A launcher could not start, stop or inspect a sandbox."""
