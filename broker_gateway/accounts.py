"""The trust domains: operator, system, router and one account per tier.

Tiers never share an account and have no imports from one another: a tier's
agents reach the router only through the exports below, each granted to that
tier alone by an activation token (``token_req``).

For each tier ``T``, the router account exports to the ``T`` account:

============================================  ===========  =====================
subject                                       kind         why
============================================  ===========  =====================
``tier.T.agent.*.out``                        service      outbox -> ingress stream,
                                                           with its PubAck
``tier.T.agent.*.in``                         stream       live inbox deliveries
``$JS.API.CONSUMER.MSG.NEXT.INBOX_T.*``       service      pull from the durable inbox
``$JS.ACK.INBOX_T.>``                         service      acknowledge it
============================================  ===========  =====================

The durable inboxes live in the router account, not in the tier account: a
tier's agents can make the server publish onto any subject of their own
account by naming it as a reply subject, so nothing the router stores may
listen on a tier account's subjects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent_sdk.names import TIERS, Tier
from broker_gateway import jwt
from broker_gateway.keys import KeyStore

SYS = "SYS"
ROUTER = "ROUTER"
JETSTREAM_LIMITS = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
NO_LIMITS = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}


def inbox_stream(tier: str) -> str:
    """Name of the router's durable inbox stream of ``tier``."""
    return f"INBOX_{tier.upper()}"


def agent_inbox_prefix(agent_id: str) -> str:
    """The reply-inbox prefix an agent's credentials allow (nats client ``inbox_prefix``)."""
    return f"_INBOX_{agent_id}"


def agent_template(tier: str) -> dict[str, Any]:
    """Permissions of every agent user of ``tier``; the server fills ``{{name()}}``."""
    name = "{{name()}}"
    stream = inbox_stream(tier)
    return {
        "pub": {
            "allow": [
                f"tier.{tier}.agent.{name}.out",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                f"$JS.ACK.{stream}.{name}.>",
            ]
        },
        "sub": {"allow": [f"tier.{tier}.agent.{name}.in", f"_INBOX_{name}.>"]},
        "subs": -1,
        "data": -1,
        "payload": -1,
    }


def router_exports(tier: str) -> list[dict[str, Any]]:
    stream = inbox_stream(tier)
    return [
        {
            "name": f"{tier}-outbox",
            "subject": f"tier.{tier}.agent.*.out",
            "type": "service",
            "token_req": True,
            "response_type": "Singleton",
        },
        {
            "name": f"{tier}-inbox-live",
            "subject": f"tier.{tier}.agent.*.in",
            "type": "stream",
            "token_req": True,
        },
        {
            "name": f"{tier}-inbox-pull",
            "subject": f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            "type": "service",
            "token_req": True,
            "response_type": "Stream",
        },
        {
            "name": f"{tier}-inbox-ack",
            "subject": f"$JS.ACK.{stream}.>",
            "type": "service",
            "token_req": True,
            "response_type": "Singleton",
        },
    ]


@dataclass(frozen=True)
class Trust:
    """The public keys of the operator and accounts, and the JWTs that bind them."""

    operator_jwt: str
    accounts: dict[str, str]  # name -> account public key
    account_jwts: dict[str, str]  # name -> account JWT
    scope_keys: dict[Tier, str]  # tier -> public key of its scoped signing key

    @property
    def system_account(self) -> str:
        return self.accounts[SYS]


def build_trust(store: KeyStore, revocations: dict[str, dict[str, int]]) -> Trust:
    """(Re)issue the operator and account JWTs from the seeds in ``store``.

    ``revocations`` maps a tier to ``{user public key: revoked-at unix seconds}``.
    """
    operator = store.keypair("operator", "operator")
    names = [SYS, ROUTER, *TIERS]
    kps = {n: store.keypair(f"account-{n}", "account") for n in names}
    pub = {n: kp.public_key.decode() for n, kp in kps.items()}
    scope = {t: store.keypair(f"scope-{t}", "account") for t in TIERS}
    scope_pub = {t: kp.public_key.decode() for t, kp in scope.items()}

    operator_jwt = jwt.encode(
        {
            "sub": operator.public_key.decode(),
            "name": "symbi",
            "nats": {"type": "operator", "version": 2, "system_account": pub[SYS]},
        },
        operator,
    )

    def account(name: str, nats: dict[str, Any]) -> str:
        body = {"type": "account", "version": 2, **nats}
        return jwt.encode({"sub": pub[name], "name": name, "nats": body}, operator)

    jwts = {
        SYS: account(
            SYS,
            {
                "limits": dict(NO_LIMITS),
                "exports": [
                    {
                        "name": "account-monitoring-services",
                        "subject": "$SYS.REQ.ACCOUNT.*.*",
                        "type": "service",
                        "response_type": "Stream",
                        "account_token_position": 4,
                    },
                    {
                        "name": "account-monitoring-streams",
                        "subject": "$SYS.ACCOUNT.*.>",
                        "type": "stream",
                        "account_token_position": 3,
                    },
                ],
            },
        ),
        ROUTER: account(
            ROUTER,
            {
                "limits": {**NO_LIMITS, **JETSTREAM_LIMITS},
                "exports": [e for t in TIERS for e in router_exports(t)],
            },
        ),
    }
    for tier in TIERS:
        imports = []
        for export in router_exports(tier):
            token = jwt.encode(
                {
                    "sub": pub[tier],
                    "name": export["name"],
                    "nats": {
                        "type": "activation",
                        "version": 2,
                        "subject": export["subject"],
                        "kind": export["type"],
                    },
                },
                kps[ROUTER],
            )
            imports.append(
                {
                    "name": export["name"],
                    "subject": export["subject"],
                    "account": pub[ROUTER],
                    "token": token,
                    "type": export["type"],
                }
            )
        jwts[tier] = account(
            tier,
            {
                "limits": dict(NO_LIMITS),
                "imports": imports,
                "signing_keys": [
                    {
                        "kind": "user_scope",
                        "key": scope_pub[tier],
                        "role": f"{tier}-agent",
                        "template": agent_template(tier),
                    }
                ],
                "revocations": dict(revocations.get(tier, {})),
                # Users the account key signs directly get nothing by default.
                "default_permissions": {"pub": {"deny": [">"]}, "sub": {"deny": [">"]}},
            },
        )
    return Trust(operator_jwt, pub, jwts, scope_pub)
