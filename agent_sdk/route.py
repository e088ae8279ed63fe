"""Route tags: a policy worker's signed statement that it routed one delivery.

The envelope signature proves who wrote a message, but not that a policy
worker let it through to *this* recipient: an agent that learns a signed
message (it was a recipient) could otherwise get it stored again somewhere, or
a delivery could claim a sender key that the registry never held. So every
delivery carries, outside the signed envelope:

- ``Symbi-Sender-Key``: the sender's registered user key ``U…``;
- ``Symbi-Route``: an Ed25519 signature, by the router's route-signing key,
  over the UTF-8 text ``symbi-route/1\\n<Symbi-Id>\\n<Symbi-From>\\n<recipient
  address>\\n<Symbi-Sender-Key>``, as unpadded base64url;
- ``Symbi-Worker``: the name of the worker that routed it (informational).

A recipient that knows the router's public key (``router_public_key`` in its
``agent.json``) checks the tag, then the envelope signature with the vouched-for
sender key. The route-signing key is a NATS user nkey, so the same
:class:`~agent_sdk.signing.Signer` and :class:`~agent_sdk.signing.Verifier`
serve both signatures.
"""

from __future__ import annotations

from typing import Final

from agent_sdk.b64 import b64url_decode, b64url_encode
from agent_sdk.errors import ContractError
from agent_sdk.signing import SIGNATURE_BYTES, Signer, Verifier

ROUTE_CONTEXT: Final = "symbi-route/1"

H_SENDER_KEY: Final = "Symbi-Sender-Key"
H_ROUTE: Final = "Symbi-Route"
H_WORKER: Final = "Symbi-Worker"

_DEFAULT_VERIFIER: Final = Verifier()


def route_signing_input(*, msg_id: str, sender: str, recipient: str, sender_key: str) -> bytes:
    """The bytes that ``Symbi-Route`` signs.

    Raises :class:`ContractError` if a field holds a line break, which could
    shift the lines of the signed text (every field is validated upstream, so
    this only guards against misuse).
    """
    fields = (msg_id, sender, recipient, sender_key)
    if any("\n" in f or "\r" in f for f in fields):
        raise ContractError("route tag fields must not contain line breaks")
    return "\n".join((ROUTE_CONTEXT, *fields)).encode("utf-8")


def sign_route(signer: Signer, *, msg_id: str, sender: str, recipient: str, sender_key: str) -> str:
    """The ``Symbi-Route`` value for one delivery, signed by the router's key."""
    data = route_signing_input(
        msg_id=msg_id, sender=sender, recipient=recipient, sender_key=sender_key
    )
    return b64url_encode(signer.sign(data))


def verify_route(
    tag: str,
    *,
    router_public_key: str,
    msg_id: str,
    sender: str,
    recipient: str,
    sender_key: str,
    verifier: Verifier | None = None,
) -> bool:
    """Whether ``tag`` is the router's route tag for exactly these four values.

    Returns a bool rather than raising: a receiver treats any failure (bad
    encoding, line breaks, a wrong key or signature) the same way, by dropping
    the delivery.
    """
    try:
        signature = b64url_decode(tag, length=SIGNATURE_BYTES)
        data = route_signing_input(
            msg_id=msg_id, sender=sender, recipient=recipient, sender_key=sender_key
        )
        (verifier or _DEFAULT_VERIFIER).verify(router_public_key, data, signature)
    except (ValueError, ContractError):  # SignatureError is a ContractError
        return False
    return True
