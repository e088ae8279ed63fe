"""What a host service accepts from its subject in the HOST stream: routed, signed requests.

The same checks as an agent's inbox (:mod:`agent_sdk.inbox`), for a host
service address such as ``host.launcher``: the message parses as an
envelope addressed to the service, a policy worker routed it to the service
(``Symbi-Route`` verifies with the router's public key for this recipient),
and ``Symbi-Sig`` verifies with the sender key the route tag vouches for.
A host service has no X25519 key, so a sealed request is refused.

Anything else is a :class:`~agent_sdk.inbox.SecurityEvent` (without the
payload), which the service logs and acknowledges without answering.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent_sdk import route
from agent_sdk.envelope import parse, verify
from agent_sdk.errors import ConfigError, EnvelopeError, SignatureError
from agent_sdk.inbox import Message, SecurityEvent, SecurityReason
from agent_sdk.names import Destination
from agent_sdk.signing import Verifier, decode_user_public_key


class HostVerifier:
    """Checks deliveries to one host service (``host.<name>`` on ``host.<name>.in``)."""

    def __init__(self, service: str, router_public_key: str) -> None:
        if Destination.parse(service).kind != "host":
            raise ConfigError(f"{service!r} is not a host service address")
        decode_user_public_key(router_public_key)
        self.service = service
        self.subject = f"{service}.in"
        self._router_key = router_public_key
        self._verifier = Verifier()

    def check(
        self, subject: str, headers: Mapping[str, str] | None, payload: bytes
    ) -> Message | SecurityEvent:
        headers = headers or {}

        def reject(reason: SecurityReason, detail: str) -> SecurityEvent:
            claimed = headers.get("Symbi-Id"), headers.get("Symbi-From")
            return SecurityEvent(
                reason,
                detail,
                subject[:256],
                claimed[0][:128] if claimed[0] else None,
                claimed[1][:128] if claimed[1] else None,
            )

        if subject != self.subject:
            return reject("misaddressed", f"not delivered on {self.subject}")
        try:
            env = parse(headers, payload)
        except SignatureError as exc:
            return reject("unsigned", str(exc))
        except EnvelopeError as exc:
            return reject("malformed", str(exc))
        if env.to != self.service:
            return reject("misaddressed", f"addressed to {env.to}")
        if Destination.parse(env.sender).kind != "agent":
            return reject("malformed", "the sender is not an agent")
        sender_key = headers.get(route.H_SENDER_KEY)
        tag = headers.get(route.H_ROUTE)
        if sender_key is None or tag is None:
            return reject("unrouted", "no route tag: not delivered by a policy worker")
        try:
            decode_user_public_key(sender_key)
        except ConfigError:
            return reject("unrouted", f"{route.H_SENDER_KEY} is not a user public key")
        if not route.verify_route(
            tag,
            router_public_key=self._router_key,
            msg_id=env.id,
            sender=env.sender,
            recipient=self.service,
            sender_key=sender_key,
            verifier=self._verifier,
        ):
            return reject("bad_route", "route tag does not verify with the router's key")
        try:
            verify(env, sender_key, verifier=self._verifier)
        except SignatureError as exc:
            return reject("bad_signature", str(exc))
        if env.enc != "none":
            return reject("undecryptable", "a host service cannot open sealed payloads")
        return Message(env, env.payload, sender_key, subject, headers.get(route.H_WORKER))
