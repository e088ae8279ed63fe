"""The command-line contract: bad input gives one clear line, a non-zero exit, writes nothing."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from tests.helpers import SymbiUp, connect_agent, connect_refused, free_port, symbi


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("symbi: error: "), stderr
    return lines[0]


@pytest.mark.parametrize(
    ("tier", "agent_id", "needle"),
    [
        ("kvm", "a1", "unknown tier"),
        ("docker", "*", "invalid agent id"),
        ("docker", "A1", "invalid agent id"),
        ("docker", "a.b", "invalid agent id"),
        ("docker", "-a", "invalid agent id"),
        ("docker", "a" * 64, "invalid agent id"),
        ("docker", ">", "invalid agent id"),
    ],
)
def test_register_refuses_bad_names(
    bus: SymbiUp, tmp_path: Path, tier: str, agent_id: str, needle: str
) -> None:
    out = tmp_path / "out"
    res = symbi(
        "agent",
        "register",
        "--tier",
        tier,
        f"--id={agent_id}",
        "--out",
        str(out),
        state_dir=bus.state_dir,
    )
    assert res.returncode != 0
    assert needle in one_error_line(res.stderr)
    assert not out.exists()


def test_register_refuses_duplicate_id_and_bad_clearance(bus: SymbiUp, tmp_path: Path) -> None:
    first = bus.register("docker", "dup1", tmp_path / "first")
    out = tmp_path / "second"
    res = symbi(
        "agent",
        "register",
        "--tier",
        "docker",
        "--id",
        "dup1",
        "--out",
        str(out),
        state_dir=bus.state_dir,
    )
    assert res.returncode != 0
    assert "already registered" in one_error_line(res.stderr)
    assert not out.exists()
    # The same id in another tier is another agent.
    other = bus.register("gvisor", "dup1", tmp_path / "third")
    assert other["public_key"] != first["public_key"]
    res = symbi(
        "agent",
        "register",
        "--tier",
        "docker",
        "--id",
        "dup2",
        "--clearance",
        "top",
        "--out",
        str(out),
        state_dir=bus.state_dir,
    )
    assert "invalid clearance" in one_error_line(res.stderr)
    assert not out.exists()


def test_register_refuses_to_overwrite_credentials(bus: SymbiUp, tmp_path: Path) -> None:
    bus.register("docker", "owner1", tmp_path)
    res = symbi(
        "agent",
        "register",
        "--tier",
        "docker",
        "--id",
        "owner2",
        "--out",
        str(tmp_path),
        state_dir=bus.state_dir,
    )
    assert "already exists" in one_error_line(res.stderr)
    listed = symbi("agent", "list", "--json", state_dir=bus.state_dir)
    assert "owner2" not in listed.stdout


def test_agent_json_has_the_contract_fields(bus: SymbiUp, tmp_path: Path) -> None:
    info = bus.register(
        "firecracker",
        "vault",
        tmp_path,
        "--clearance",
        "secret",
        "--capability",
        "rpc",
        "--capability",
        "control",
    )
    for key in (
        "address",
        "tier",
        "id",
        "nats_url",
        "outbox",
        "inbox",
        "public_key",
        "clearance",
        "capabilities",
        "encryption_public_key",
        "encryption_secret_key",
        "inbox_prefix",
        "inbox_stream",
        "inbox_consumer",
    ):
        assert key in info, key
    assert info["address"] == "firecracker.vault"
    assert info["clearance"] == "secret"
    assert info["capabilities"] == ["control", "rpc"]
    assert info["public_key"].startswith("U")
    listed = symbi("agent", "list", state_dir=bus.state_dir)
    row = next(line for line in listed.stdout.splitlines() if "firecracker.vault" in line)
    assert row.split() == ["firecracker.vault", "secret", "control,rpc", "active"]


def test_commands_without_a_running_broker(tmp_path: Path) -> None:
    res = symbi("agent", "list", state_dir=tmp_path / "nothing")
    assert "does not exist" in one_error_line(res.stderr)
    assert not (tmp_path / "nothing").exists()
    res = symbi("agent", "revoke", "--tier", "docker", "--id", "a1", state_dir=tmp_path)
    assert "symbi up" in one_error_line(res.stderr)


def test_revoke_unknown_agent(bus: SymbiUp) -> None:
    res = symbi("agent", "revoke", "--tier", "docker", "--id", "ghost", state_dir=bus.state_dir)
    assert "no agent docker.ghost" in one_error_line(res.stderr)


def test_up_refuses_a_bad_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "communication_policies:\n"
        "  - name: d2g\n"
        "    source_tier: docker\n"
        "    destination_tier: gvisor\n"
        "    allowed_message_typos: [data]\n"
    )
    state = tmp_path / "state"
    res = symbi(
        "up",
        "--policies",
        str(policy),
        "--nats-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        state_dir=state,
    )
    line = one_error_line(res.stderr)
    assert res.returncode != 0
    assert "d2g" in line
    assert "allowed_message_typos" in line
    assert not state.exists()


def test_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        state = tmp_path / "state"
        res = symbi(
            "up", "--nats-port", str(port), "--http-port", str(free_port()), state_dir=state
        )
        assert res.returncode != 0
        assert f"127.0.0.1:{port} is already in use" in one_error_line(res.stderr)
        res = symbi(
            "up", "--nats-port", str(free_port()), "--http-port", str(port), state_dir=state
        )
        assert f"127.0.0.1:{port} is already in use" in one_error_line(res.stderr)
        assert not state.exists()


def test_up_refuses_an_unusable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = symbi(
        "up",
        "--nats-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        state_dir=blocker / "state",
    )
    assert res.returncode != 0
    assert "is unusable" in one_error_line(res.stderr)


def test_second_up_on_the_same_state_dir_is_refused(bus: SymbiUp) -> None:
    res = symbi(
        "up",
        "--nats-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        state_dir=bus.state_dir,
    )
    assert res.returncode != 0
    assert "in use by another" in one_error_line(res.stderr)


async def test_revoke_closes_the_connection_and_refuses_reconnection(
    bus: SymbiUp, tmp_path: Path
) -> None:
    bus.register("docker", "rev1", tmp_path / "rev1")
    bus.register("docker", "keep1", tmp_path / "keep1")
    closed = asyncio.Event()

    async def on_disconnect() -> None:
        closed.set()

    victim = await connect_agent(
        tmp_path / "rev1",
        disconnected_cb=on_disconnect,
        max_reconnect_attempts=2,
        reconnect_time_wait=0.2,
    )
    bystander = await connect_agent(tmp_path / "keep1")
    try:
        res = await asyncio.to_thread(
            symbi, "agent", "revoke", "--tier", "docker", "--id", "rev1", state_dir=bus.state_dir
        )
        assert res.returncode == 0, res.stderr
        # The contract's bound: closed within two seconds of the revocation.
        await asyncio.wait_for(closed.wait(), 2.0)
        assert not victim.nc.is_connected
        refusal = await connect_refused(bus.url, tmp_path / "rev1" / "agent.creds")
        assert "authorization" in refusal.lower() or "revoked" in refusal.lower()
        assert bystander.nc.is_connected
        await bystander.nc.jetstream().publish("tier.docker.agent.keep1.out", b"still here")
        listed = symbi("agent", "list", "--json", state_dir=bus.state_dir)
        status = {
            json.loads(line)["id"]: json.loads(line)["status"]
            for line in listed.stdout.splitlines()
        }
        assert status["rev1"] == "revoked"
        assert status["keep1"] == "active"
    finally:
        await victim.nc.close()
        await bystander.nc.close()


async def test_restart_keeps_agents_keys_and_stored_messages(tmp_path: Path) -> None:
    up = SymbiUp(tmp_path / "state")
    up.start()
    try:
        up.register("docker", "s1", tmp_path / "s1")
        up.register("gvisor", "s2", tmp_path / "s2")
        agent = await connect_agent(tmp_path / "s1")
        ack = await agent.nc.jetstream().publish(
            "tier.docker.agent.s1.out", b"kept", headers={"Nats-Msg-Id": "restart-1"}
        )
        await agent.nc.close()
        assert (
            symbi(
                "agent", "revoke", "--tier", "gvisor", "--id", "s2", state_dir=up.state_dir
            ).returncode
            == 0
        )
        operator_key = (up.state_dir / "keys" / "operator.nk").read_bytes()
    finally:
        assert up.stop() == 0
    assert "stopped" in "".join(up.output)

    # Same ports: agent.json names the URL its agent connects to.
    again = SymbiUp(tmp_path / "state", nats_port=up.nats_port, http_port=up.http_port)
    again.start()
    try:
        assert (again.state_dir / "keys" / "operator.nk").read_bytes() == operator_key
        listed = symbi("agent", "list", "--json", state_dir=again.state_dir)
        status = {
            json.loads(line)["address"]: json.loads(line)["status"]
            for line in listed.stdout.splitlines()
        }
        assert status == {"docker.s1": "active", "gvisor.s2": "revoked"}
        agent = await connect_agent(tmp_path / "s1")  # old credentials, new server process
        try:
            import nats

            state_creds = again.state_dir / "creds" / "router.creds"
            router = await nats.connect(again.url, user_credentials=str(state_creds))
            stored = await router.jetstream().get_msg("INGRESS", ack.seq)
            assert stored.data == b"kept"
            await router.close()
        finally:
            await agent.nc.close()
        refusal = await connect_refused(again.url, tmp_path / "s2" / "agent.creds")
        assert "authorization" in refusal.lower() or "revoked" in refusal.lower()
    finally:
        assert again.stop() == 0
