"""The pure policy decision: every reason code, the ok path, and their precedence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from agent_sdk.errors import CryptoError
from agent_sdk.names import AgentAddress
from broker_gateway.records import AgentRecord
from policy_worker.decision import REASONS, Decision, decide
from policy_worker.policy import PolicySet, parse_policies

NOW = 1_796_000_000_000
SKEW = 30_000
KEY = "U" + "A" * 55

POLICIES = parse_policies(
    r"""
communication_policies:
  - name: docker_to_docker
    source_tier: docker
    destination_tier: docker
    allowed_message_types: [control, data, event, rpc]
  - name: docker_to_gvisor
    source_tier: docker
    destination_tier: gvisor
    allowed_message_types: [data, event, rpc]
    security_requirements: {encryption_min_level: confidential, content_filtering: true}
    max_payload_bytes: 64
    content_filter:
      rules:
        - {name: private_key, pattern: "BEGIN [A-Z ]*PRIVATE KEY"}
        - {name: binary, pattern: "\ufffd"}
    required_capabilities: {data: [export]}
    allow_senders: ["docker.a*"]
    deny_senders: ["docker.a666"]
    allow_recipients: ["gvisor.*", "event.metrics.*"]
    deny_recipients: ["gvisor.vault"]
  - name: docker_to_firecracker
    source_tier: docker
    destination_tier: firecracker
    allowed_message_types: [data, event]
    security_requirements:
      encryption_required: true
      content_filtering: true
      audit_logging: false
    content_filter:
      inspect_sealed: true
      rules: [{name: secret_word, pattern: swordfish, ignore_case: true}]
  - name: docker_to_host
    source_tier: docker
    destination_tier: host
    allowed_message_types: [control, rpc]
""",
    source="test",
)


@dataclass(frozen=True)
class FakeEnvelope:
    sender: str = "docker.a1"
    to: str = "gvisor.b1"
    type: str = "data"
    time_ms: int = NOW
    level: str = "restricted"
    enc: str = "none"
    payload: bytes = b'{"result": 42}'
    id: str = "7f1c2a9e-3b4d-4e5f-8a6b-0c1d2e3f4a5b"
    nonce: int = 1
    reply_to: str | None = None
    sig: str | None = "x" * 86


def agent(address: str, clearance: str = "confidential", *caps: str, **kw: Any) -> AgentRecord:
    tier, _, agent_id = address.partition(".")
    return AgentRecord(
        tier=tier,
        id=agent_id,
        public_key=KEY,
        encryption_public_key="k",
        clearance=clearance,
        capabilities=caps,
        **kw,
    )


SENDER = agent("docker.a1", "confidential", "rpc", "control", "export")
RECIPIENT = agent("gvisor.b1", "confidential")


def run(
    env: FakeEnvelope | None = None,
    *,
    arrived_from: str = "docker.a1",
    sender: AgentRecord | None = SENDER,
    recipient: AgentRecord | None = RECIPIENT,
    dst_tier: str = "gvisor",
    policies: PolicySet = POLICIES,
    now_ms: int = NOW,
    open_sealed: Callable[[bytes], bytes] | None = None,
) -> Decision:
    return decide(
        env or FakeEnvelope(),
        arrived_from=AgentAddress.parse(arrived_from),
        sender=sender,
        recipient=recipient,
        dst_tier=dst_tier,
        policies=policies,
        now_ms=now_ms,
        max_skew_ms=SKEW,
        open_sealed=open_sealed,
    )


def test_reason_codes_are_the_contracts() -> None:
    assert set(REASONS) == {
        "ok", "malformed", "unsigned", "bad_signature", "from_mismatch", "unknown_sender",
        "unknown_destination", "stale", "replay", "no_policy", "type_not_allowed",
        "rate_limited", "clearance", "capability", "encryption_required", "content_filtered",
    }  # fmt: skip


def test_ok() -> None:
    decision = run()
    assert decision.allowed
    assert decision.reason == "ok"
    assert decision.policy_name == "docker_to_gvisor"
    assert decision.policy is not None
    assert decision.policy.rate == 100
    assert decision.audited


def test_every_check_in_order() -> None:
    """Start with a message that fails everything; fixing one check reveals the next."""
    case: dict[str, Any] = {
        "env": FakeEnvelope(
            type="control",
            level="secret",
            time_ms=NOW - SKEW - 1,
            to="gvisor.vault",
            payload=b"BEGIN RSA PRIVATE KEY" + b"." * 64,
        ),
        "arrived_from": "docker.zz",
        "sender": SENDER.model_copy(update={"status": "revoked", "capabilities": ()}),
        "recipient": agent("gvisor.vault", status="revoked"),
        "policies": PolicySet([p for p in POLICIES if p.name != "docker_to_gvisor"]),
    }

    def env(**changes: Any) -> Callable[[dict[str, Any]], None]:
        return lambda c: c.update(env=replace(c["env"], **changes))

    def sender(**changes: Any) -> Callable[[dict[str, Any]], None]:
        return lambda c: c.update(sender=c["sender"].model_copy(update=changes))

    steps: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("from_mismatch", lambda c: c.update(arrived_from="docker.a1")),
        ("unknown_sender", sender(status="active")),
        ("unknown_destination", lambda c: c.update(recipient=agent("gvisor.vault"))),
        ("stale", env(time_ms=NOW + SKEW)),
        ("no_policy", lambda c: c.update(policies=POLICIES)),
        ("type_not_allowed", env(type="data")),
        ("clearance", env(level="confidential")),
        ("capability", sender(capabilities=("export",))),
        (
            "no_policy",
            lambda c: c.update(recipient=RECIPIENT, env=replace(c["env"], to="gvisor.b1")),
        ),
        ("malformed", env(payload=b"BEGIN RSA PRIVATE KEY")),
        ("encryption_required", env(level="restricted")),
        ("content_filtered", env(payload=b"hello")),
        ("ok", lambda c: None),
    ]
    seen = []
    for _, fix in steps:
        seen.append(run(**case).reason)
        fix(case)
    assert seen == [reason for reason, _ in steps]


def test_from_mismatch() -> None:
    decision = run(arrived_from="docker.a2")
    assert decision.reason == "from_mismatch"
    assert decision.policy is None
    assert decision.audited


@pytest.mark.parametrize(
    "sender",
    [None, SENDER.model_copy(update={"status": "revoked"}), agent("docker.other")],
    ids=["unregistered", "revoked", "someone-else's-record"],
)
def test_unknown_sender(sender: AgentRecord | None) -> None:
    assert run(sender=sender).reason == "unknown_sender"


@pytest.mark.parametrize(
    "recipient",
    [None, RECIPIENT.model_copy(update={"status": "revoked"}), agent("docker.b1")],
    ids=["unregistered", "revoked", "other-tier"],
)
def test_unknown_destination(recipient: AgentRecord | None) -> None:
    assert run(recipient=recipient).reason == "unknown_destination"


def test_host_services_have_no_record() -> None:
    env = FakeEnvelope(to="host.launcher", type="rpc")
    decision = run(env, recipient=None, dst_tier="host")
    assert (decision.reason, decision.policy_name) == ("ok", "docker_to_host")


@pytest.mark.parametrize(
    ("time_ms", "reason"),
    [
        (NOW - SKEW, "ok"),
        (NOW + SKEW, "ok"),
        (NOW - SKEW - 1, "stale"),
        (NOW + SKEW + 1, "stale"),
        (0, "stale"),
    ],
)
def test_stale(time_ms: int, reason: str) -> None:
    assert run(FakeEnvelope(time_ms=time_ms)).reason == reason


def test_no_policy() -> None:
    env = FakeEnvelope(sender="gvisor.g1", to="docker.d1")
    decision = run(
        env,
        arrived_from="gvisor.g1",
        sender=agent("gvisor.g1"),
        recipient=agent("docker.d1"),
        dst_tier="docker",
    )
    assert (decision.reason, decision.policy) == ("no_policy", None)


def test_type_not_allowed() -> None:
    decision = run(FakeEnvelope(type="control"))
    assert (decision.reason, decision.policy_name) == ("type_not_allowed", "docker_to_gvisor")


@pytest.mark.parametrize(
    ("level", "sender_clearance", "recipient_clearance", "reason"),
    [
        ("secret", "secret", "secret", "encryption_required"),  # clearance passes
        ("secret", "confidential", "secret", "clearance"),
        ("secret", "secret", "confidential", "clearance"),
        ("public", "public", "public", "ok"),
        ("restricted", "public", "secret", "clearance"),
    ],
)
def test_clearance(
    level: str, sender_clearance: str, recipient_clearance: str, reason: str
) -> None:
    sender = SENDER.model_copy(update={"clearance": sender_clearance})
    recipient = RECIPIENT.model_copy(update={"clearance": recipient_clearance})
    assert run(FakeEnvelope(level=level), sender=sender, recipient=recipient).reason == reason


def test_clearance_to_a_host_service_is_the_senders_alone() -> None:
    env = FakeEnvelope(to="host.launcher", type="rpc", level="secret")
    assert run(env, recipient=None, dst_tier="host").reason == "clearance"
    sender = SENDER.model_copy(update={"clearance": "secret"})
    assert run(env, sender=sender, recipient=None, dst_tier="host").reason == "ok"


@pytest.mark.parametrize(
    ("msg_type", "to", "dst_tier", "capabilities", "reason"),
    [
        ("rpc", "gvisor.b1", "gvisor", ("export",), "capability"),
        ("rpc", "gvisor.b1", "gvisor", ("rpc",), "ok"),
        ("data", "gvisor.b1", "gvisor", (), "capability"),  # the policy requires export
        ("data", "gvisor.b1", "gvisor", ("export",), "ok"),
        ("control", "docker.b1", "docker", ("rpc",), "capability"),
        ("control", "docker.b1", "docker", ("control",), "ok"),
        ("data", "docker.b1", "docker", (), "ok"),
        ("event", "event.news", "docker", (), "ok"),
    ],
)
def test_capability(
    msg_type: str, to: str, dst_tier: str, capabilities: tuple[str, ...], reason: str
) -> None:
    sender = SENDER.model_copy(update={"capabilities": capabilities})
    recipient = agent(f"{dst_tier}.b1")
    env = FakeEnvelope(type=msg_type, to=to)
    assert run(env, sender=sender, recipient=recipient, dst_tier=dst_tier).reason == reason


@pytest.mark.parametrize(
    ("sender", "recipient", "to", "detail"),
    [
        ("docker.a666", "gvisor.b1", "gvisor.b1", "sender is in deny_senders"),
        ("docker.b2", "gvisor.b1", "gvisor.b1", "sender is not in allow_senders"),
        ("docker.a1", "gvisor.vault", "gvisor.vault", "recipient is in deny_recipients"),
        ("docker.a1", "gvisor.vault", "event.metrics.cpu", "recipient is in deny_recipients"),
        ("docker.a1", "gvisor.b1", "event.metrics.cpu", None),
        ("docker.a1", "gvisor.b1", "event.news", None),  # gvisor.* lets the recipient in
    ],
)
def test_allow_and_deny_lists(sender: str, recipient: str, to: str, detail: str | None) -> None:
    env = FakeEnvelope(sender=sender, to=to, type="event" if to.startswith("event.") else "data")
    record = SENDER.model_copy(update={"id": sender.partition(".")[2]})
    decision = run(env, arrived_from=sender, sender=record, recipient=agent(recipient))
    if detail is None:
        assert decision.reason == "ok"
    else:
        assert (decision.reason, decision.detail) == ("no_policy", detail)
        assert decision.policy_name == "docker_to_gvisor"


def test_allow_recipients_by_topic_alone() -> None:
    policies = parse_policies(
        "communication_policies:\n"
        "  - {name: p, source_tier: docker, destination_tier: gvisor,\n"
        "     allowed_message_types: [event], allow_recipients: ['event.metrics.*']}\n"
    )
    env = FakeEnvelope(type="event", to="event.metrics.cpu")
    assert run(env, policies=policies).reason == "ok"
    env = FakeEnvelope(type="event", to="event.news")
    assert run(env, policies=policies).detail == "recipient is not in allow_recipients"


def test_malformed() -> None:
    assert run(FakeEnvelope(payload=b"x" * 64)).reason == "ok"
    decision = run(FakeEnvelope(payload=b"x" * 65))
    assert (decision.reason, decision.detail) == ("malformed", "payload over 64 bytes")
    assert run(FakeEnvelope(level="top-secret")).reason == "malformed"


@pytest.mark.parametrize(
    ("level", "enc", "reason"),
    [
        ("restricted", "none", "ok"),
        ("confidential", "none", "encryption_required"),
        ("secret", "none", "encryption_required"),
        # sealed, so the filter (which has rules and no inspection here) cannot read it
        ("confidential", "x25519-sealed", "content_filtered"),
    ],
)
def test_encryption_required_from_a_level(level: str, enc: str, reason: str) -> None:
    sender = SENDER.model_copy(update={"clearance": "secret"})
    recipient = RECIPIENT.model_copy(update={"clearance": "secret"})
    env = FakeEnvelope(level=level, enc=enc)
    assert run(env, sender=sender, recipient=recipient).reason == reason


def to_firecracker(payload: bytes, enc: str = "x25519-sealed", **kw: Any) -> Decision:
    env = FakeEnvelope(to="firecracker.f1", payload=payload, enc=enc)
    return run(env, recipient=agent("firecracker.f1"), dst_tier="firecracker", **kw)


def test_encryption_required_for_everything() -> None:
    assert to_firecracker(b"hi", enc="none", open_sealed=bytes).reason == "encryption_required"


@pytest.mark.parametrize(
    ("payload", "rule"),
    [
        (b"-----BEGIN OPENSSH PRIVATE KEY-----", "private_key"),
        (b"\xff\xfe binary", "binary"),  # invalid UTF-8 becomes U+FFFD and is matched
        ("café".encode(), None),
    ],
)
def test_content_filter_on_plaintext(payload: bytes, rule: str | None) -> None:
    decision = run(FakeEnvelope(payload=payload))
    if rule is None:
        assert decision.reason == "ok"
    else:
        assert (decision.reason, decision.detail) == ("content_filtered", f"matched rule {rule!r}")


def test_a_sealed_payload_is_filtered_only_through_the_opener() -> None:
    opened: list[bytes] = []

    def open_sealed(sealed: bytes) -> bytes:
        opened.append(sealed)
        return sealed.removeprefix(b"sealed:")

    assert to_firecracker(b"sealed:hello", open_sealed=open_sealed).reason == "ok"
    decision = to_firecracker(b"sealed:the SwordFish", open_sealed=open_sealed)
    assert (decision.reason, decision.detail) == ("content_filtered", "matched rule 'secret_word'")
    assert opened == [b"sealed:hello", b"sealed:the SwordFish"]  # handed the bytes as sent


def test_a_sealed_payload_that_cannot_be_opened_is_denied() -> None:
    def broken(sealed: bytes) -> bytes:
        raise CryptoError("not for this key")

    assert to_firecracker(b"sealed", open_sealed=None).reason == "content_filtered"
    decision = to_firecracker(b"sealed", open_sealed=broken)
    assert decision.reason == "content_filtered"
    assert "could not be opened" in decision.detail


def test_filtering_without_rules_passes_sealed_payloads() -> None:
    """The seed policy requires both encryption and filtering, and no rules: usable."""
    seed = parse_policies(
        "communication_policies:\n"
        "  - {name: s, source_tier: docker, destination_tier: gvisor,\n"
        "     allowed_message_types: [data],\n"
        "     security_requirements: {encryption_required: true, content_filtering: true}}\n"
    )
    assert run(FakeEnvelope(enc="x25519-sealed"), policies=seed).reason == "ok"
    assert run(FakeEnvelope(), policies=seed).reason == "encryption_required"


def test_audit_logging_false_spares_only_allowed_messages() -> None:
    allowed = to_firecracker(b"fine", open_sealed=bytes)
    assert allowed.allowed
    assert not allowed.audited
    denied = to_firecracker(b"swordfish", open_sealed=bytes)
    assert not denied.allowed
    assert denied.audited


def test_the_real_envelope_fits() -> None:
    envelope = pytest.importorskip("agent_sdk.envelope")
    env = envelope.Envelope(
        id="7f1c2a9e-3b4d-4e5f-8a6b-0c1d2e3f4a5b",
        sender="docker.a1",
        to="gvisor.b1",
        type="data",
        time_ms=NOW,
        nonce=1,
        level="restricted",
        payload=b"hello",
    )
    decision = decide(
        env,
        arrived_from=AgentAddress("docker", "a1"),
        sender=SENDER,
        recipient=RECIPIENT,
        dst_tier="gvisor",
        policies=POLICIES,
        now_ms=NOW,
        max_skew_ms=SKEW,
    )
    assert decision.reason == "ok"
