"""Reading ``agent.creds`` and ``agent.json`` (agent_sdk.credentials), without a server.

The files are made the way the gateway makes them (its JWT and creds-file
writers), so the SDK is checked against the real format; one test at the end
reads the files that a real ``symbi agent register`` wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import nkeys
import pytest

from agent_sdk.credentials import ENV_AGENT_DIR, AgentConfig, read_credentials
from agent_sdk.errors import ConfigError
from agent_sdk.sealing import EncryptionKeyPair
from broker_gateway import jwt
from broker_gateway.keys import new_seed, public_key, write_secret
from broker_gateway.users import mint_agent
from tests.helpers import SymbiUp


def _creds(agent_id: str = "a1", ttl_s: int = 3600, seed: bytes | None = None) -> tuple[str, str]:
    """``(creds file text, seed)`` of a freshly minted docker agent."""
    account = nkeys.from_seed(bytearray(new_seed("account")))
    token, user_seed = mint_agent(
        "docker", agent_id, account.public_key.decode(), account, ttl_s=ttl_s, user_seed=seed
    )
    return jwt.creds_file(token, user_seed), user_seed.decode()


def _agent_json(seed: str, **changes: Any) -> dict[str, Any]:
    enc = EncryptionKeyPair.generate()
    info: dict[str, Any] = {
        "address": "docker.a1",
        "tier": "docker",
        "id": "a1",
        "nats_url": "nats://127.0.0.1:4222",
        "outbox": "tier.docker.agent.a1.out",
        "inbox": "tier.docker.agent.a1.in",
        "public_key": public_key(seed.encode()),
        "clearance": "restricted",
        "capabilities": ["rpc"],
        "subscriptions": [],
        "encryption_public_key": enc.public_key,
        "encryption_secret_key": enc.secret_key,
        "inbox_prefix": "_INBOX_a1",
        "inbox_stream": "INBOX_DOCKER",
        "inbox_consumer": "a1",
        "router_public_key": public_key(new_seed("user")),
        "expires": int(time.time()) + 3600,
    }
    info.update(changes)
    return info


def _write_agent(directory: Path, **changes: Any) -> tuple[Path, str]:
    creds, seed = _creds()
    write_secret(directory / "agent.creds", creds)
    write_secret(directory / "agent.json", json.dumps(_agent_json(seed, **changes)))
    return directory, seed


def test_reads_the_gateway_creds_format(tmp_path: Path) -> None:
    text, seed = _creds()
    path = tmp_path / "agent.creds"
    write_secret(path, text)
    creds = read_credentials(path)
    assert creds.public_key == public_key(seed.encode())
    assert creds.jwt.count(".") == 2 and creds.expires is not None
    assert seed not in repr(creds) and creds.jwt not in repr(creds)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(
            lambda text, seed: text.replace(
                seed, seed[:-2] + ("B" if seed[-2] == "A" else "A") + seed[-1]
            ),
            id="bad-checksum",
        ),
        pytest.param(lambda text, seed: text.replace(seed, seed[:20]), id="truncated"),
        pytest.param(lambda text, seed: text.replace(seed, "SA" + seed[2:]), id="account-seed"),
        pytest.param(
            lambda text, seed: text.replace("-----BEGIN NATS USER JWT-----", ""), id="no-jwt"
        ),
    ],
)
def test_bad_creds_fail_without_echoing_the_seed(tmp_path: Path, mangle: Any) -> None:
    text, seed = _creds()
    path = tmp_path / "agent.creds"
    path.write_text(mangle(text, seed))
    with pytest.raises(ConfigError) as info:
        read_credentials(path)
    rendered = "".join(str(e) for e in (info.value, info.value.__cause__) if e is not None)
    assert str(path) in str(info.value)
    assert seed[2:20] not in rendered


def test_jwt_of_another_key_is_refused(tmp_path: Path) -> None:
    text, _ = _creds()
    _, other_seed = _creds()
    mixed = text.split("-----BEGIN USER NKEY SEED-----")[0]
    mixed += f"-----BEGIN USER NKEY SEED-----\n{other_seed}\n------END USER NKEY SEED------\n"
    path = tmp_path / "agent.creds"
    path.write_text(mixed)
    with pytest.raises(ConfigError, match="does not belong to the seed"):
        read_credentials(path)


def test_expired_creds_are_refused(tmp_path: Path) -> None:
    text, _ = _creds(ttl_s=-10)
    path = tmp_path / "agent.creds"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expired"):
        read_credentials(path)


def test_missing_creds_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read credentials"):
        read_credentials(tmp_path / "nope.creds")


def test_agent_config_loads_from_dir_file_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = _write_agent(tmp_path)
    by_dir = AgentConfig.load(directory)
    by_file = AgentConfig.load(directory / "agent.json")
    monkeypatch.setenv(ENV_AGENT_DIR, str(directory))
    by_env = AgentConfig.load()
    assert by_dir == by_file == by_env
    assert str(by_dir.address) == "docker.a1" and by_dir.outbox == "tier.docker.agent.a1.out"
    assert by_dir.creds_path == directory / "agent.creds"
    assert by_dir.credentials().public_key == by_dir.public_key
    assert by_dir.encryption_secret_key not in repr(by_dir)
    assert by_dir.encryption_keys().public_key == by_dir.encryption_public_key


def test_no_source_and_no_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_AGENT_DIR, raising=False)
    with pytest.raises(ConfigError, match=ENV_AGENT_DIR):
        AgentConfig.load()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"address": "docker.b1"}, "address"),
        ({"tier": "kvm"}, "address"),
        ({"outbox": "tier.docker.agent.b1.out"}, "outbox"),
        ({"inbox": "tier.docker.agent.b1.in"}, "inbox"),
        ({"nats_url": "http://x"}, "nats_url"),
        ({"clearance": "top"}, "clearance"),
        ({"public_key": "UABC"}, "public_key"),
        ({"router_public_key": None}, "router_public_key"),
        ({"encryption_public_key": EncryptionKeyPair.generate().public_key}, "does not match"),
        ({"encryption_secret_key": "short"}, "secret key"),
        ({"inbox_prefix": "_INBOX_a1.*"}, "inbox_prefix"),
        ({"inbox_stream": "IN BOX"}, "inbox_stream"),
        ({"capabilities": "rpc"}, "capabilities"),
        ({"expires": "soon"}, "expires"),
    ],
)
def test_agent_config_names_the_bad_field(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    directory, _ = _write_agent(tmp_path, **changes)
    with pytest.raises(ConfigError, match=field) as info:
        AgentConfig.load(directory)
    secret = json.loads((directory / "agent.json").read_text())["encryption_secret_key"]
    assert secret not in str(info.value)


def test_creds_of_another_agent_are_refused(tmp_path: Path) -> None:
    directory, _ = _write_agent(tmp_path)
    other, _ = _creds()
    (directory / "agent.creds").write_text(other)
    with pytest.raises(ConfigError, match="another agent"):
        AgentConfig.load(directory).credentials()


def test_unknown_fields_are_accepted(tmp_path: Path) -> None:
    # The command-line contract lists what agent.json holds "at least".
    directory, _ = _write_agent(tmp_path, future_field={"x": 1})
    assert AgentConfig.load(directory).id == "a1"


def test_files_of_a_real_registration_load(bus: SymbiUp, tmp_path: Path) -> None:
    info = bus.register("gvisor", "cred1", tmp_path / "cred1", "--capability", "rpc")
    config = AgentConfig.load(tmp_path / "cred1")
    assert str(config.address) == info["address"] == "gvisor.cred1"
    assert config.inbox_stream == info["inbox_stream"] and config.capabilities == ("rpc",)
    assert config.credentials().public_key == info["public_key"]
