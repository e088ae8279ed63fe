"""What an agent accepts from its inbox: verified deliveries, nothing else.

NATS does not check reply subjects, so another agent can make the server
publish junk onto this agent's live inbox subject, and a bug or a compromised
component could store something odd in the durable one. The client therefore
hands its user only a delivery that passes every check below, in this order
(cheap checks first, signatures last):

1. it arrived on this agent's inbox subject, and its envelope parses
   (``malformed``, ``unsigned``);
2. ``Symbi-To`` is this agent's address or an ``event.<topic>``
   (``misaddressed``);
3. a policy worker routed it: ``Symbi-Sender-Key`` and ``Symbi-Route`` are
   present (``unrouted``) and the route tag verifies with the router's key for
   (id, sender, this agent, sender key) (``bad_route``), so a delivery to
   another agent, or one claiming another sender's key, is refused;
4. the envelope signature verifies with that sender key (``bad_signature``):
   the payload and headers are exactly what the sender signed;
5. a sealed payload opens with this agent's X25519 key (``undecryptable``).

Anything else becomes a :class:`SecurityEvent`; the client drops it and
acknowledges it, so that it cannot wedge the inbox.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

from agent_sdk import route
from agent_sdk.envelope import Envelope, parse, verify
from agent_sdk.errors import ConfigError, CryptoError, EnvelopeError, SignatureError
from agent_sdk.headers import Enc
from agent_sdk.names import AgentAddress, Level, MessageType
from agent_sdk.sealing import EncryptionKeyPair
from agent_sdk.signing import Verifier, decode_user_public_key

SecurityReason = Literal[
    "malformed",
    "unsigned",
    "misaddressed",
    "unrouted",
    "bad_route",
    "bad_signature",
    "undecryptable",
    "unexpected_reply",
]
SECURITY_REASONS: Final[tuple[SecurityReason, ...]] = get_args(SecurityReason)


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """A delivery that was dropped, and why; never carries the payload.

    ``msg_id`` and ``sender`` are the claimed ``Symbi-Id`` and ``Symbi-From``
    when they could be read, and are unproven by definition.
    """

    reason: SecurityReason
    detail: str
    subject: str
    msg_id: str | None = None
    sender: str | None = None
    time_ms: int = dataclasses.field(default_factory=lambda: time.time_ns() // 1_000_000)


@dataclass(frozen=True, slots=True)
class Message:
    """A verified message for this agent; ``payload`` is the plaintext (opened if sealed).

    ``sender_key`` is the sender's registered user key, vouched for by the
    router and proved by the envelope signature. The payload is left out of
    ``repr``.
    """

    envelope: Envelope
    payload: bytes = dataclasses.field(repr=False)
    sender_key: str
    subject: str
    worker: str | None = None

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def sender(self) -> str:
        """The sender's agent address (``Symbi-From``)."""
        return self.envelope.sender

    @property
    def to(self) -> str:
        return self.envelope.to

    @property
    def type(self) -> MessageType:
        return self.envelope.type

    @property
    def level(self) -> Level:
        return self.envelope.level

    @property
    def enc(self) -> Enc:
        return self.envelope.enc

    @property
    def encrypted(self) -> bool:
        """Whether the payload travelled sealed to this agent's key."""
        return self.envelope.enc != "none"

    @property
    def reply_to(self) -> str | None:
        return self.envelope.reply_to

    @property
    def time_ms(self) -> int:
        return self.envelope.time_ms

    @property
    def topic(self) -> str | None:
        """The event topic, for an event; else None."""
        if self.envelope.type != "event":
            return None
        return self.envelope.to.removeprefix("event.")

    @property
    def is_request(self) -> bool:
        """An rpc request, which expects :meth:`AgentClient.reply`."""
        return self.envelope.type == "rpc" and self.envelope.reply_to is None

    @property
    def is_reply(self) -> bool:
        return self.envelope.type == "rpc" and self.envelope.reply_to is not None


class InboxVerifier:
    """Applies the checks of this module to deliveries addressed to one agent."""

    def __init__(
        self,
        address: AgentAddress,
        router_public_key: str,
        keys: EncryptionKeyPair,
        *,
        verifier: Verifier | None = None,
    ) -> None:
        decode_user_public_key(router_public_key)  # fail at start-up, not per message
        self.address = address
        self._me = str(address)
        self._router_key = router_public_key
        self._keys = keys
        self._verifier = verifier or Verifier()

    def check(
        self, subject: str, headers: Mapping[str, str] | None, payload: bytes
    ) -> Message | SecurityEvent:
        """The verified :class:`Message`, or the :class:`SecurityEvent` that rejects it."""
        headers = headers or {}

        def reject(
            reason: SecurityReason, detail: str, env: Envelope | None = None
        ) -> SecurityEvent:
            msg_id = env.id if env else _claimed(headers, "Symbi-Id")
            sender = env.sender if env else _claimed(headers, "Symbi-From")
            return SecurityEvent(reason, detail, subject[:256], msg_id, sender)

        if subject != self.address.inbox:
            return reject("misaddressed", "not delivered on this agent's inbox subject")
        try:
            env = parse(headers, payload)
        except SignatureError as exc:
            return reject("unsigned", str(exc))
        except EnvelopeError as exc:
            return reject("malformed", str(exc))
        if env.to != self._me and env.type != "event":
            return reject("misaddressed", f"addressed to {env.to}", env)
        sender_key = headers.get(route.H_SENDER_KEY)
        tag = headers.get(route.H_ROUTE)
        if sender_key is None or tag is None:
            return reject("unrouted", "no route tag: not delivered by a policy worker", env)
        try:
            decode_user_public_key(sender_key)
        except ConfigError:
            return reject("unrouted", f"{route.H_SENDER_KEY} is not a user public key", env)
        if not route.verify_route(
            tag,
            router_public_key=self._router_key,
            msg_id=env.id,
            sender=env.sender,
            recipient=self._me,
            sender_key=sender_key,
            verifier=self._verifier,
        ):
            return reject("bad_route", "route tag does not verify with the router's key", env)
        try:
            verify(env, sender_key, verifier=self._verifier)
        except SignatureError as exc:
            return reject("bad_signature", str(exc), env)
        plaintext = env.payload
        if env.enc == "x25519-sealed":
            try:
                plaintext = self._keys.open(env.payload)
            except CryptoError as exc:
                return reject("undecryptable", str(exc), env)
        return Message(env, plaintext, sender_key, subject, headers.get(route.H_WORKER))


def _claimed(headers: Mapping[str, str], name: str) -> str | None:
    """A header value for a report, cut short: it is unverified and may be hostile."""
    value = headers.get(name)
    return None if value is None else value[:128]


class DedupWindow:
    """The last ``maxsize`` (sender, ``Symbi-Id``) pairs handled, least recently seen first out.

    A redelivery (a lost acknowledgement, a worker retry) of a message already
    handled is recognised here and acknowledged without reaching the user again.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ConfigError(f"dedup window must hold at least 1 id, got {maxsize}")
        self.maxsize = maxsize
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        return False

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: tuple[str, str]) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self.maxsize:
            self._seen.popitem(last=False)
