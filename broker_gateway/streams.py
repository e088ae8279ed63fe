"""JetStream streams, consumers and KV buckets of the router account.

All of them are created idempotently at start (``ensure_all``); on a cluster
``replicas`` > 1 replicates each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from agent_sdk.names import TIERS, inbox_subject
from broker_gateway.accounts import inbox_stream

INGRESS = "INGRESS"
AUDIT = "AUDIT"
DEAD_LETTER = "DEADLETTER"
HOST = "HOST"
WORKERS_CONSUMER = "workers"
REGISTRY_BUCKET = "symbi_registry"
REVOCATIONS_BUCKET = "symbi_revocations"
NONCE_BUCKET = "symbi_nonces"
RATE_BUCKET = "symbi_rates"

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class StreamSettings:
    """What a deployment may tune; everything has a safe default for one machine."""

    replicas: int = 1
    max_skew_s: float = 30.0
    inbox_max_age_s: float = 7 * DAY_S
    audit_max_age_s: float = 30 * DAY_S
    ingress_ack_wait_s: float = 30.0

    @property
    def dedup_window_s(self) -> float:
        # A message is fresh for max_skew on either side of the worker's clock,
        # so a retried publish must be recognised for at least twice that long.
        return max(2 * self.max_skew_s, 120.0)


def stream_configs(s: StreamSettings) -> list[StreamConfig]:
    configs = [
        StreamConfig(
            name=INGRESS,
            description="every agent's outbox; consumed by the policy workers",
            subjects=["tier.*.agent.*.out"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=s.dedup_window_s,
            num_replicas=s.replicas,
            discard=DiscardPolicy.NEW,
            max_msgs_per_subject=-1,
        ),
        StreamConfig(
            name=AUDIT,
            description="one record per policy decision",
            subjects=["audit.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=s.audit_max_age_s,
            duplicate_window=s.dedup_window_s,
            num_replicas=s.replicas,
        ),
        StreamConfig(
            name=DEAD_LETTER,
            description="ingress messages a worker could not process, with the reason",
            subjects=["deadletter.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=s.audit_max_age_s,
            num_replicas=s.replicas,
        ),
    ]
    configs.append(
        StreamConfig(
            name=HOST,
            description="deliveries to host services (host.<name>.in), e.g. the launchers",
            subjects=["host.*.in"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=s.inbox_max_age_s,
            duplicate_window=s.dedup_window_s,
            num_replicas=s.replicas,
        )
    )
    for tier in TIERS:
        configs.append(
            StreamConfig(
                name=inbox_stream(tier),
                description=f"durable inboxes of the {tier} tier's agents",
                subjects=[f"tier.{tier}.agent.*.in"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=s.inbox_max_age_s,
                duplicate_window=s.dedup_window_s,
                num_replicas=s.replicas,
            )
        )
    return configs


def bucket_configs(s: StreamSettings) -> list[KeyValueConfig]:
    return [
        KeyValueConfig(
            bucket=REGISTRY_BUCKET, history=5, replicas=s.replicas, description="registered agents"
        ),
        KeyValueConfig(
            bucket=REVOCATIONS_BUCKET,
            history=1,
            replicas=s.replicas,
            description="revoked agent user keys, per tier",
        ),
        KeyValueConfig(
            bucket=NONCE_BUCKET,
            history=1,
            replicas=s.replicas,
            ttl=s.dedup_window_s,
            description="seen (sender, nonce) pairs",
        ),
        KeyValueConfig(
            bucket=RATE_BUCKET,
            history=1,
            replicas=s.replicas,
            ttl=3600.0,
            description="per-sender rate limiter state",
        ),
    ]


async def _add_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def ensure_all(js: JetStreamContext, s: StreamSettings) -> None:
    """Create (or bring up to date) every stream, bucket and the workers' consumer."""
    for config in stream_configs(s):
        await _add_or_update(js, config)
    for bucket in bucket_configs(s):
        try:
            await js.key_value(bucket.bucket)
        except (NotFoundError, BadRequestError):
            await js.create_key_value(bucket)
    await js.add_consumer(
        INGRESS,
        ConsumerConfig(
            durable_name=WORKERS_CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.ingress_ack_wait_s,
            max_ack_pending=20_000,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.ALL,
        ),
    )


def inbox_consumer_config(tier: str, agent_id: str) -> ConsumerConfig:
    """The durable pull consumer through which one agent reads its inbox."""
    return ConsumerConfig(
        durable_name=agent_id,
        description=f"durable inbox of {tier}.{agent_id}",
        filter_subject=inbox_subject(tier, agent_id),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_ack_pending=1000,
        deliver_policy=DeliverPolicy.ALL,
    )
