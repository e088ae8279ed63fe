"""The broker itself confines every agent to its own outbox and inbox (issue 2).

Everything here runs against a real ``symbi up`` and connects with plain
nats.py from the files that ``symbi agent register`` wrote.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from broker_gateway import jwt
from broker_gateway.state import StateDir
from broker_gateway.users import mint_agent
from tests.helpers import Agent, SymbiUp, close_all, connect_agent, connect_refused


@pytest.fixture(scope="module")
def agents(bus: SymbiUp, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for tier, agent_id in [("docker", "a1"), ("docker", "b1"), ("gvisor", "g1")]:
        out = tmp_path_factory.mktemp(f"{tier}-{agent_id}")
        bus.register(tier, agent_id, out)
        dirs[f"{tier}.{agent_id}"] = out
    return dirs


@pytest.fixture
async def a1(agents: dict[str, Path]) -> Agent:
    agent = await connect_agent(agents["docker.a1"])
    yield agent  # type: ignore[misc]
    await close_all(agent)


@pytest.fixture
async def router(bus: SymbiUp) -> nats.NATS:
    """The router's service user, as the policy workers connect."""
    nc = await bus.connect_router()
    yield nc  # type: ignore[misc]
    await nc.close()


async def test_credentials_connect_publish_and_receive(
    agents: dict[str, Path], router: nats.NATS
) -> None:
    a1 = await connect_agent(agents["docker.a1"])
    b1 = await connect_agent(agents["docker.b1"])
    try:
        info = a1.info
        assert info["outbox"] == "tier.docker.agent.a1.out"
        assert info["inbox"] == "tier.docker.agent.a1.in"
        for name in ("agent.creds", "agent.json"):
            assert (agents["docker.a1"] / name).stat().st_mode & 0o777 == 0o600
        ack = await a1.nc.jetstream().publish(
            info["outbox"], b"hello", headers={"Nats-Msg-Id": "t-1"}
        )
        assert ack.stream == "INGRESS"
        stored = await router.jetstream().get_msg("INGRESS", ack.seq)
        assert stored.subject == "tier.docker.agent.a1.out" and stored.data == b"hello"

        live: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            await live.put(msg)

        await b1.nc.subscribe(b1.info["inbox"], cb=on_msg)
        await b1.nc.flush()
        # A worker's delivery: stored durably in the router account, and live.
        delivered = await router.jetstream().publish(
            "tier.docker.agent.b1.in", b"routed", headers={"Symbi-Id": "d-1"}
        )
        assert delivered.stream == b1.info["inbox_stream"]
        msg = await asyncio.wait_for(live.get(), 5)
        assert msg.data == b"routed" and msg.headers == {"Symbi-Id": "d-1"}
        psub = await b1.nc.jetstream().pull_subscribe_bind(
            b1.info["inbox_consumer"], stream=b1.info["inbox_stream"]
        )
        [durable] = await psub.fetch(1, timeout=5)
        assert durable.data == b"routed"
        await durable.ack_sync()
    finally:
        await close_all(a1, b1)


@pytest.mark.parametrize(
    "subject",
    [
        "tier.docker.agent.b1.out",  # another agent's outbox
        "tier.docker.agent.b1.in",  # another agent's inbox
        "tier.docker.agent.a1.in",  # even its own inbox: only workers deliver
        "tier.gvisor.agent.g1.out",  # another tier
        "tier.gvisor.agent.g1.in",
        "audit.allow.docker.docker",
        "$KV.symbi_registry.docker.a1",  # the registry
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.INBOX_DOCKER",
        "$JS.API.CONSUMER.INFO.INBOX_DOCKER.a1",
        "$JS.API.CONSUMER.MSG.NEXT.INBOX_DOCKER.b1",  # another agent's durable inbox
        "$JS.ACK.INBOX_DOCKER.b1.1.1.1.1.0",
        "$JS.API.STREAM.MSG.GET.INGRESS",
        "$SYS.REQ.CLAIMS.UPDATE",
    ],
)
async def test_publish_outside_own_subjects_is_refused(a1: Agent, subject: str) -> None:
    await a1.nc.publish(subject, b"x")
    await a1.nc.flush()
    err = await a1.wait_error("permissions violation for publish")
    assert subject.lower() in err.lower()


@pytest.mark.parametrize(
    "subject",
    [
        "tier.docker.agent.b1.in",
        ">",
        "tier.>",
        "tier.docker.agent.*.in",
        "tier.docker.agent.*.out",
        "_INBOX_b1.>",  # another agent's reply inbox
        "_INBOX_.>",
        "tier.gvisor.agent.g1.in",
        "audit.>",
        "$JS.ACK.INBOX_DOCKER.b1.>",
    ],
)
async def test_subscribe_outside_own_subjects_is_refused(a1: Agent, subject: str) -> None:
    await a1.nc.subscribe(subject)
    await a1.nc.flush()
    err = await a1.wait_error("permissions violation for subscription")
    assert subject.lower() in err.lower()


async def test_jetstream_api_only_reaches_own_inbox_consumer(a1: Agent) -> None:
    js = a1.nc.jetstream()
    with pytest.raises((NatsTimeout, NoRespondersError)):
        await js.stream_info("INBOX_DOCKER")
    with pytest.raises((NatsTimeout, NoRespondersError)):
        await js.add_stream(name="EVIL", subjects=["tier.docker.agent.b1.in"])
    own = await js.pull_subscribe_bind(a1.info["inbox_consumer"], stream=a1.info["inbox_stream"])
    with pytest.raises(NatsTimeout):
        await own.fetch(1, timeout=0.5)  # allowed, merely empty
    other = await js.pull_subscribe_bind("b1", stream="INBOX_DOCKER")
    with pytest.raises(NatsTimeout):
        await other.fetch(1, timeout=0.5)
    await a1.wait_error("permissions violation for publish")


async def test_jwt_of_one_tier_cannot_connect_as_another(bus: SymbiUp, tmp_path: Path) -> None:
    state = StateDir.open(bus.state_dir, create=False)
    from broker_gateway.accounts import build_trust

    trust = build_trust(state.keys, {})
    # Signed by docker's scoped key, claiming the gvisor account.
    token, seed = mint_agent(
        "gvisor", "x1", trust.accounts["gvisor"], state.keys.keypair("scope-docker", "account")
    )
    creds = tmp_path / "x.creds"
    creds.write_text(jwt.creds_file(token, seed))
    assert "authorization" in (await connect_refused(bus.url, creds)).lower()


async def test_hand_edited_jwt_is_refused(
    bus: SymbiUp, agents: dict[str, Path], tmp_path: Path
) -> None:
    token, seed = jwt.parse_creds((agents["docker.a1"] / "agent.creds").read_text())
    header, _, sig = token.split(".")
    claims = jwt.decode(token)
    claims["name"] = "*"  # would widen the template to every agent
    forged_payload = jwt._b64url(json.dumps(claims, separators=(",", ":")).encode())
    creds = tmp_path / "forged.creds"
    creds.write_text(jwt.creds_file(f"{header}.{forged_payload}.{sig}", seed))
    assert "authorization" in (await connect_refused(bus.url, creds)).lower()


async def test_reply_subject_injection_never_reaches_a_durable_inbox(
    agents: dict[str, Path], router: nats.NATS
) -> None:
    a1 = await connect_agent(agents["docker.a1"])
    b1 = await connect_agent(agents["docker.b1"])
    try:
        js = router.jetstream()
        before = (await js.stream_info("INBOX_DOCKER")).state.messages
        live: list[nats.aio.msg.Msg] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            live.append(msg)

        await b1.nc.subscribe("tier.docker.agent.b1.in", cb=on_msg)
        await b1.nc.flush()
        # a1 names b1's inbox as the reply of its own outbox publish: the
        # ingress stream's PubAck is sent there.
        await a1.nc.publish(
            "tier.docker.agent.a1.out",
            b"x",
            reply="tier.docker.agent.b1.in",
            headers={"Nats-Msg-Id": "inject-1"},
        )
        await a1.nc.flush()
        await asyncio.sleep(0.5)
        assert (await js.stream_info("INBOX_DOCKER")).state.messages == before
        # A plain live subscriber sees the junk, without any envelope header.
        assert [json.loads(m.data)["stream"] for m in live] == ["INGRESS"]
        assert not (live[0].headers or {}).get("Symbi-Sig")
    finally:
        await close_all(a1, b1)


async def test_reply_injection_cannot_acknowledge_anothers_inbox(
    agents: dict[str, Path], router: nats.NATS
) -> None:
    a1 = await connect_agent(agents["docker.a1"])
    b1 = await connect_agent(agents["docker.b1"])
    try:
        js = router.jetstream()
        await js.publish("tier.docker.agent.b1.in", b"pending", headers={"Symbi-Id": "p-1"})
        psub = await b1.nc.jetstream().pull_subscribe_bind("b1", stream="INBOX_DOCKER")
        [msg] = await psub.fetch(1, timeout=5)
        assert (await js.consumer_info("INBOX_DOCKER", "b1")).num_ack_pending == 1
        # Responses that carry an empty body would be read as "+ACK" by a consumer:
        # a no-wait pull's 404 status and an empty outbox message's PubAck.
        await a1.nc.publish(
            "$JS.API.CONSUMER.MSG.NEXT.INBOX_DOCKER.a1",
            b'{"batch":1,"no_wait":true}',
            reply=msg.reply,
        )
        await a1.nc.publish(
            "tier.docker.agent.a1.out", b"", reply=msg.reply, headers={"Nats-Msg-Id": "inject-2"}
        )
        await a1.nc.flush()
        await asyncio.sleep(0.5)
        assert (await js.consumer_info("INBOX_DOCKER", "b1")).num_ack_pending == 1
        await msg.ack_sync()
    finally:
        await close_all(a1, b1)


async def test_shared_dedup_window_cannot_suppress_another_sender(
    agents: dict[str, Path], router: nats.NATS
) -> None:
    a1 = await connect_agent(agents["docker.a1"])
    b1 = await connect_agent(agents["docker.b1"])
    try:
        js = router.jetstream()
        # b1 sends; a1 learns the id (it is the recipient) and reuses it.
        ack_b = await b1.nc.jetstream().publish(
            "tier.docker.agent.b1.out", b"from b1", headers={"Nats-Msg-Id": "shared-id"}
        )
        ack_a = await a1.nc.jetstream().publish(
            "tier.docker.agent.a1.out", b"from a1", headers={"Nats-Msg-Id": "shared-id"}
        )
        assert ack_a.duplicate and ack_a.seq == ack_b.seq
        stored = await js.get_msg("INGRESS", ack_b.seq)
        # b1's message is stored, intact, under b1's own outbox: a reused id
        # only ever drops the reuser's own publish.
        assert stored.subject == "tier.docker.agent.b1.out" and stored.data == b"from b1"
        # b1's own retry of the same publish is recognised, not stored twice.
        again = await b1.nc.jetstream().publish(
            "tier.docker.agent.b1.out", b"from b1", headers={"Nats-Msg-Id": "shared-id"}
        )
        assert again.duplicate and again.seq == ack_b.seq
    finally:
        await close_all(a1, b1)
