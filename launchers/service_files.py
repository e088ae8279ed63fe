"""What a tier's launcher service gets from ``symbi up``, and nothing more.

``symbi up`` holds every key. For each tier ``T`` it prepares, under
``<state>/launchers/T/`` (mode 0700, files 0600):

``service.creds``
    a NATS user of the router account, signed by that account, allowed only
    what the launcher does (:func:`launcher_permissions`): read the registry,
    write the registry records of tier ``T``, create the inbox consumers of
    tier ``T``, read its own consumer of the ``HOST`` stream, and ask the
    gateway to revoke an agent of tier ``T`` (:mod:`broker_gateway.revoke_service`).
``service.json``
    public keys only: the ``T`` account's (the issuer of its agents) and the
    router's route key (``router_public_key`` in every ``agent.json``).

With these and ``keys/scope-T.nk`` (the tier's scoped signing key, whose
template the server enforces), the launcher registers and starts agents of
tier ``T``; it never reads the operator, account or route-signing seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

from agent_sdk.errors import ConfigError
from agent_sdk.names import check_tier
from broker_gateway import jwt
from broker_gateway.accounts import ROUTER, Trust, inbox_stream
from broker_gateway.keys import KeyStore, public_key, route_signer_seed, write_secret
from broker_gateway.revoke_service import revoke_subject
from broker_gateway.state import StateDir
from broker_gateway.streams import HOST, REGISTRY_BUCKET
from broker_gateway.users import mint_service

#: The host service the launchers serve, its delivery subject in the HOST stream.
SERVICE: Final = "launcher"
SERVICE_ADDRESS: Final = f"host.{SERVICE}"
CONTROL_SUBJECT: Final = f"host.{SERVICE}.in"
#: A launched sandbox may take this long (a micro-VM under emulation); the
#: service reports progress to JetStream meanwhile.
CONTROL_ACK_WAIT_S: Final = 60.0
CONTROL_MAX_DELIVER: Final = 3


def service_dir(state_root: Path, tier: str) -> Path:
    return state_root / "launchers" / check_tier(tier)


def control_consumer(tier: str) -> str:
    """The durable consumer that every launcher instance of ``tier`` shares."""
    return f"launcher-{check_tier(tier)}"


def inbox_prefix(tier: str) -> str:
    """Reply subjects of the launcher's service user (it may subscribe to these only)."""
    return f"_LAUNCHER_{check_tier(tier)}"


def launcher_permissions(tier: str) -> dict[str, Any]:
    """What the service user of ``tier``'s launcher may publish and subscribe to."""
    tier = check_tier(tier)
    kv_stream = f"KV_{REGISTRY_BUCKET}"
    inboxes = inbox_stream(tier)
    consumer = control_consumer(tier)
    return {
        "pub": {
            "allow": [
                # the registry: read everything, write its own tier's records
                f"$JS.API.STREAM.INFO.{kv_stream}",
                f"$JS.API.DIRECT.GET.{kv_stream}",
                f"$JS.API.DIRECT.GET.{kv_stream}.>",
                f"$JS.API.STREAM.MSG.GET.{kv_stream}",
                f"$KV.{REGISTRY_BUCKET}.{tier}.*",
                # watching it (an ordered consumer): create, flow control, delete
                f"$JS.API.CONSUMER.CREATE.{kv_stream}",
                f"$JS.API.CONSUMER.CREATE.{kv_stream}.>",
                f"$JS.API.CONSUMER.INFO.{kv_stream}.*",
                f"$JS.API.CONSUMER.DELETE.{kv_stream}.*",
                f"$JS.FC.{kv_stream}.>",
                # the durable inbox consumers of its tier's agents
                f"$JS.API.CONSUMER.CREATE.{inboxes}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{inboxes}.*",
                # its control messages
                f"$JS.API.CONSUMER.CREATE.{HOST}.{consumer}",
                f"$JS.API.CONSUMER.CREATE.{HOST}.{consumer}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{HOST}.{consumer}",
                f"$JS.API.CONSUMER.INFO.{HOST}.{consumer}",
                f"$JS.API.CONSUMER.MSG.NEXT.{HOST}.{consumer}",
                f"$JS.ACK.{HOST}.{consumer}.>",
                # revocation, by the gateway
                revoke_subject(tier),
            ]
        },
        "sub": {"allow": [f"{inbox_prefix(tier)}.>"]},
    }


def control_consumer_config(tier: str) -> ConsumerConfig:
    """Only requests sent after the consumer exists: an old backlog is never acted on."""
    return ConsumerConfig(
        durable_name=control_consumer(tier),
        description=f"control messages for the {tier} launchers",
        filter_subject=CONTROL_SUBJECT,
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=CONTROL_ACK_WAIT_S,
        max_deliver=CONTROL_MAX_DELIVER,
        max_ack_pending=256,
    )


async def ensure_control_consumer(js: JetStreamContext, tier: str) -> None:
    """Create the shared consumer, or keep the one that exists (idempotent)."""
    try:
        await js.add_consumer(HOST, control_consumer_config(tier))
    except BadRequestError:
        # It exists with another configuration (an older version): use it as it is.
        await js.consumer_info(HOST, control_consumer(tier))


@dataclass(frozen=True)
class ServiceFiles:
    """The paths and public keys a launcher service of one tier starts from."""

    tier: str
    creds: Path
    account_public_key: str
    router_public_key: str
    scope_key_path: Path

    @classmethod
    def read(cls, state: StateDir, tier: str) -> ServiceFiles:
        directory = service_dir(state.root, tier)
        try:
            info = json.loads((directory / "service.json").read_text())
            account, router = str(info["account_public_key"]), str(info["router_public_key"])
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{directory} is not prepared: start `symbi up` on {state.root} first"
            ) from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"unreadable {directory / 'service.json'}") from exc
        scope_key = KeyStore(state.root).path(f"scope-{tier}")
        return cls(tier, directory / "service.creds", account, router, scope_key)


def prepare(state: StateDir, trust: Trust, tier: str) -> ServiceFiles:
    """Write (or bring up to date) the files of ``tier``'s launcher; needs the router's key."""
    directory = service_dir(state.root, tier)
    directory.parent.mkdir(mode=0o700, exist_ok=True)
    keys = state.keys
    info = {
        "tier": tier,
        "account_public_key": trust.accounts[tier],
        "router_public_key": public_key(route_signer_seed(keys)),
    }
    write_secret(directory / "service.json", json.dumps(info, indent=2) + "\n")
    keys.seed(f"scope-{tier}", "account")  # exists once the trust is built; never changes
    creds = directory / "service.creds"
    wanted = launcher_permissions(tier)
    if _permissions(creds) != wanted:
        token, seed = mint_service(
            f"launcher-{tier}", keys.keypair(f"account-{ROUTER}", "account"), wanted
        )
        write_secret(creds, jwt.creds_file(token, seed))
    return ServiceFiles.read(state, tier)


def _permissions(creds: Path) -> dict[str, Any] | None:
    """The pub/sub permissions of an existing service user, None if there is none."""
    try:
        token, _ = jwt.parse_creds(creds.read_text())
        claims = jwt.decode(token, verify=False)["nats"]
    except (OSError, ConfigError, KeyError, TypeError):
        return None
    return {"pub": claims.get("pub"), "sub": claims.get("sub")}
