"""The launcher service's rules without a bus: requests, who may ask, routing, probes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent_sdk.envelope import build, sign, to_headers
from agent_sdk.inbox import Message, SecurityEvent
from agent_sdk.names import Level, Tier
from agent_sdk.route import H_ROUTE, H_SENDER_KEY, sign_route
from agent_sdk.signing import Signer
from broker_gateway.keys import new_seed
from broker_gateway.records import AgentRecord
from launchers.availability import TierRuntime, probe, summary
from launchers.backend import Sandbox
from launchers.control import (
    LaunchOp,
    Refused,
    ServicePolicy,
    check_owner,
    launch_request,
    parse_op,
    responsible_tier,
)
from launchers.host_delivery import HostVerifier
from launchers.service_files import launcher_permissions

ROUTER = Signer.from_seed(new_seed("user"))
ALICE = Signer.from_seed(new_seed("user"))


def record(
    tier: Tier = "docker",
    agent_id: str = "boss",
    clearance: Level = "confidential",
    capabilities: tuple[str, ...] = ("control", "rpc"),
) -> AgentRecord:
    return AgentRecord(
        tier=tier,
        id=agent_id,
        public_key=ALICE.public_key,
        encryption_public_key="x" * 43,
        clearance=clearance,
        capabilities=capabilities,
    )


def launch(**fields: object) -> LaunchOp:
    op = parse_op(json.dumps({"op": "launch", "id": "kid", "command": ["true"], **fields}).encode())
    assert isinstance(op, LaunchOp)
    return op


@pytest.mark.parametrize(
    ("payload", "sender", "tier"),
    [
        (b'{"op": "status", "tier": "gvisor", "id": "a"}', "docker", "gvisor"),
        (b'{"op": "status", "id": "a"}', "firecracker", "firecracker"),
        (b'{"op": "status", "tier": "host", "id": "a"}', "gvisor", "gvisor"),
        (b'{"tier": ["docker"]}', "gvisor", "gvisor"),
        (b"[1, 2]", "docker", "docker"),
        (b"\xff not json", "gvisor", "gvisor"),
    ],
)
def test_exactly_one_tier_answers_each_request(payload: bytes, sender: Tier, tier: Tier) -> None:
    assert responsible_tier(payload, sender) == tier


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (b"{}", "request"),
        (b'{"op": "launch", "id": "a"}', "launch.command"),
        (b'{"op": "launch", "id": "A*", "command": ["x"]}', "launch.id"),
        (b'{"op": "launch", "id": "a", "command": ["x"], "app": "/"}', "launch.app"),
        (b'{"op": "launch", "id": "a", "command": [""]}', "launch.command"),
        (b'{"op": "launch", "id": "a", "command": ["x"], "env": {"A=B": "c"}}', "launch.env"),
        (
            b'{"op": "launch", "id": "a", "command": ["x"], "subscriptions": ["a..b"]}',
            "launch.subs",
        ),
        (b'{"op": "stop", "id": "a", "timeout_s": 3600}', "stop.timeout_s"),
        (b'{"op": "status", "id": "a", "tier": "cloud"}', "status.tier"),
    ],
)
def test_malformed_requests_say_where(payload: bytes, where: str) -> None:
    with pytest.raises(Refused) as info:
        parse_op(payload)
    assert info.value.code == "invalid"
    assert str(info.value).startswith(where), str(info.value)


def test_a_launch_is_bounded_by_its_requester() -> None:
    boss = record()
    request = launch_request(launch(capabilities=["rpc"]), "gvisor", boss, ServicePolicy(), 0)
    assert (request.tier, request.backend, request.owner) == ("gvisor", "gvisor", "docker.boss")
    assert request.capabilities == ("rpc",) and request.clearance == "restricted"
    refusals = {
        "may not launch into": (launch(), "docker", record("gvisor"), 0),
        "clearance secret": (launch(clearance="secret"), "docker", boss, 0),
        "lacks: admin": (launch(capabilities=["admin"]), "docker", boss, 0),
        "not allowed": (launch(image="alpine"), "docker", boss, 0),
        "above the maximum": (launch(limits={"cpus": 8}), "docker", boss, 0),
        "already runs 8": (launch(), "docker", boss, 8),
        "reserved": (launch(id="launcher"), "docker", boss, 0),
        "not an isolation boundary": (launch(backend="process"), "docker", boss, 0),
        "weaker than the gvisor tier": (launch(backend="docker"), "gvisor", boss, 0),
    }
    for detail, (op, tier, requester, owned) in refusals.items():
        with pytest.raises(Refused, match=detail):
            launch_request(op, tier, requester, ServicePolicy(), owned)


def test_only_the_owner_or_the_agent_itself_may_stop_or_inspect(tmp_path: Path) -> None:
    sandbox = Sandbox("docker", "docker", "kid", tmp_path, owner="docker.boss")
    check_owner(sandbox, record())
    check_owner(sandbox, record(agent_id="kid"))
    with pytest.raises(Refused, match="did not launch"):
        check_owner(sandbox, record(agent_id="other"))
    launched_by_operator = Sandbox("docker", "docker", "kid", tmp_path)
    with pytest.raises(Refused):
        check_owner(launched_by_operator, record())


def delivery(
    to: str = "host.launcher", recipient: str = "host.launcher"
) -> tuple[dict[str, str], bytes]:
    env = sign(build(sender="docker.boss", to=to, type="rpc", level="public", payload=b"{}"), ALICE)
    headers = to_headers(env)
    headers[H_SENDER_KEY] = ALICE.public_key
    headers[H_ROUTE] = sign_route(
        ROUTER, msg_id=env.id, sender=env.sender, recipient=recipient, sender_key=ALICE.public_key
    )
    return headers, env.payload


def test_the_service_accepts_only_routed_signed_requests() -> None:
    verifier = HostVerifier("host.launcher", ROUTER.public_key)
    headers, payload = delivery()
    accepted = verifier.check("host.launcher.in", headers, payload)
    assert isinstance(accepted, Message) and accepted.is_request
    cases = {
        "unrouted": ({k: v for k, v in headers.items() if k != H_ROUTE}, payload),
        "bad_route": delivery(recipient="host.bus"),
        "bad_signature": (headers, b'{"op": "forged"}'),
        "misaddressed": delivery(to="host.bus", recipient="host.bus"),
    }
    for reason, (h, p) in cases.items():
        rejected = verifier.check("host.launcher.in", h, p)
        assert isinstance(rejected, SecurityEvent) and rejected.reason == reason, rejected
    wrong_subject = verifier.check("host.bus.in", headers, payload)
    assert isinstance(wrong_subject, SecurityEvent)


def test_the_launcher_user_names_only_its_tier() -> None:
    allowed = launcher_permissions("gvisor")
    subjects = allowed["pub"]["allow"] + allowed["sub"]["allow"]
    assert all("docker" not in s and "firecracker" not in s for s in subjects)
    assert "symbi.admin.revoke.gvisor" in subjects
    assert allowed["sub"]["allow"] == ["_LAUNCHER_gvisor.>"]
    assert not any(s.startswith(("$SYS", "$JS.API.STREAM.DELETE", ">")) for s in subjects)


def test_availability_is_reported_not_raised() -> None:
    found = probe({"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert [r.tier for r in found] == ["docker", "gvisor", "firecracker"]
    why = "need root" if os.geteuid() != 0 else "Docker not reachable at unix:///nonexistent"
    assert not found[0].available and why in (found[0].missing or "")
    assert not found[1].available
    assert (
        summary(
            [
                TierRuntime("docker", "docker"),
                TierRuntime("gvisor", "runsc"),
                TierRuntime("firecracker", "qemu-system-x86_64", "micro-VM runtime missing (x)"),
            ]
        )
        == "docker (docker), gvisor (runsc); firecracker: micro-VM runtime missing (x)"
    )
    assert summary([TierRuntime("docker", "docker", "gone")]) == "none; docker: gone"
