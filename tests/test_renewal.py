"""Agent credentials expire and are renewed with the same key; old revocations are pruned."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest

from broker_gateway import jwt
from broker_gateway.gateway import Gateway
from broker_gateway.state import StateDir
from broker_gateway.streams import REVOCATIONS_BUCKET
from broker_gateway.users import MAX_AGENT_TTL_S
from tests.helpers import SymbiUp, connect_agent, symbi


def test_registered_credentials_expire(bus: SymbiUp, tmp_path: Path) -> None:
    bus.register("docker", "exp1", tmp_path)
    token, _ = jwt.parse_creds((tmp_path / "agent.creds").read_text())
    claims = jwt.decode(token)
    assert 0 < claims["exp"] - claims["iat"] <= MAX_AGENT_TTL_S


async def test_renew_keeps_the_key_and_connects(bus: SymbiUp, tmp_path: Path) -> None:
    info = bus.register("docker", "ren1", tmp_path)
    old_jwt, old_seed = jwt.parse_creds((tmp_path / "agent.creds").read_text())
    await asyncio.sleep(1.1)  # a later issue time
    res = symbi(
        "agent",
        "renew",
        "--tier",
        "docker",
        "--id",
        "ren1",
        "--creds",
        str(tmp_path / "agent.creds"),
        state_dir=bus.state_dir,
    )
    assert res.returncode == 0, res.stderr
    new_jwt, new_seed = jwt.parse_creds((tmp_path / "agent.creds").read_text())
    assert new_seed == old_seed
    assert new_jwt != old_jwt
    assert jwt.decode(new_jwt)["sub"] == info["public_key"]
    assert jwt.decode(new_jwt)["exp"] > jwt.decode(old_jwt)["exp"]
    assert (tmp_path / "agent.creds").stat().st_mode & 0o777 == 0o600
    agent = await connect_agent(tmp_path)
    ack = await agent.nc.jetstream().publish(
        info["outbox"], b"renewed", headers={"Nats-Msg-Id": "renew-1"}
    )
    assert ack.stream == "INGRESS"
    await agent.nc.close()


def test_renew_refuses_revoked_agents_and_foreign_credentials(bus: SymbiUp, tmp_path: Path) -> None:
    bus.register("docker", "ren2", tmp_path / "ren2")
    bus.register("docker", "ren3", tmp_path / "ren3")
    res = symbi(
        "agent",
        "renew",
        "--tier",
        "docker",
        "--id",
        "ren2",
        "--creds",
        str(tmp_path / "ren3" / "agent.creds"),
        state_dir=bus.state_dir,
    )
    assert res.returncode != 0
    assert "not those of docker.ren2" in res.stderr
    assert (
        symbi(
            "agent", "revoke", "--tier", "docker", "--id", "ren2", state_dir=bus.state_dir
        ).returncode
        == 0
    )
    before = (tmp_path / "ren2" / "agent.creds").read_bytes()
    res = symbi(
        "agent",
        "renew",
        "--tier",
        "docker",
        "--id",
        "ren2",
        "--creds",
        str(tmp_path / "ren2" / "agent.creds"),
        state_dir=bus.state_dir,
    )
    assert res.returncode != 0
    assert "revoked" in res.stderr
    assert (tmp_path / "ren2" / "agent.creds").read_bytes() == before


async def test_revocations_older_than_any_credential_are_pruned(bus: SymbiUp) -> None:
    state = StateDir.open(bus.state_dir, create=False)
    gateway = await Gateway.connect(state, bus.url)
    try:
        kv = await gateway.js.key_value(REVOCATIONS_BUCKET)
        ancient = int(time.time()) - MAX_AGENT_TTL_S - 60
        recent = int(time.time())
        await kv.put("docker.UOLDOLDOLD", str(ancient).encode())
        await kv.put("docker.UNEWNEWNEW", str(recent).encode())
        revocations = await gateway.revocations()
        assert "UOLDOLDOLD" not in revocations["docker"]
        assert revocations["docker"]["UNEWNEWNEW"] == recent
        claims = jwt.decode((await gateway.trust()).account_jwts["docker"])
        assert "UOLDOLDOLD" not in claims["nats"]["revocations"]
        assert "UNEWNEWNEW" in claims["nats"]["revocations"]
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("docker.UOLDOLDOLD")
    finally:
        await gateway.close()
