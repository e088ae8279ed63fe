"""The agents of ``symbi demo``, each its own process: ``python -m symbi.demo_agent ROLE DIR``.

Every agent prints one JSON object per line on stdout (what it sent, received
or answered) for the demo's report. The well-behaved roles use the SDK;
``mallory`` speaks plain nats.py with its own credentials, as any compromised
agent could, and tries the attacks the policy workers must refuse.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats

from agent_sdk.client import AgentClient
from agent_sdk.credentials import AgentConfig
from agent_sdk.envelope import Envelope, build, sign, to_headers
from agent_sdk.inbox import Message
from agent_sdk.signing import Signer

REPLY_TIMEOUT_S = 20.0


def emit(agent: str, event: str, **fields: Any) -> None:
    print(json.dumps({"agent": agent, "event": event, **fields}), flush=True)


async def _until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def responder(directory: Path) -> None:
    """Print what arrives; answer rpc requests. Runs until SIGTERM."""
    async with await AgentClient.connect(directory) as client:

        async def handle(msg: Message) -> None:
            emit(
                client.address,
                "received",
                type=msg.type,
                sender=msg.sender,
                to=msg.to,
                level=msg.level,
                sealed=msg.encrypted,
                payload=msg.payload.decode(errors="replace"),
            )
            if msg.is_request:
                await client.reply(msg, b"plan: step 1, step 2, step 3")
                emit(client.address, "answered", to=msg.sender, request=msg.id)

        task = asyncio.create_task(client.handle(handle))
        emit(client.address, "ready")
        await _until_terminated()
        task.cancel()


async def worker_a1(directory: Path, vault_key: str) -> None:
    """Data to a peer, an rpc round trip to another tier, a sealed message to a micro-VM."""
    async with await AgentClient.connect(directory) as client:
        await client.send("docker.b1", b"hello from a1", level="restricted")
        emit(client.address, "sent", to="docker.b1", type="data")
        started = time.perf_counter()
        answer = await client.request(
            "gvisor.planner", b"what is the plan?", level="restricted", timeout=REPLY_TIMEOUT_S
        )
        emit(
            client.address,
            "rpc_answer",
            sender=answer.sender,
            payload=answer.payload.decode(errors="replace"),
            round_trip_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        await client.send(
            "firecracker.vault", b"the launch codes", level="confidential", encrypt=vault_key
        )
        emit(client.address, "sent", to="firecracker.vault", type="data", sealed=True)


async def sensor(directory: Path) -> None:
    async with await AgentClient.connect(directory) as client:
        await client.publish("alerts.cpu", b"cpu at 97%", level="public")
        emit(client.address, "sent", to="event.alerts.cpu", type="event")


async def mallory(directory: Path) -> None:
    """A compromised agent: impersonation, a forged signature, a replay, a flood, a
    message type its policy forbids. Plain nats.py: the SDK would refuse to help."""
    config = AgentConfig.load(directory)
    signer = config.credentials().signer
    me = str(config.address)
    nc = await nats.connect(
        config.nats_url,
        user_credentials=str(config.creds_path),
        inbox_prefix=config.inbox_prefix.encode(),
    )
    js = nc.jetstream()

    async def publish(env: Envelope, label: str, msg_id: str | None = None) -> None:
        headers = to_headers(env)
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        await js.publish(config.outbox, env.payload, headers=headers)
        emit(me, "attack", attack=label, id=env.id)

    # 1. Impersonation: claims to be docker.a1 (signed with mallory's own key).
    await publish(
        sign(
            build(
                sender="docker.a1",
                to="docker.b1",
                type="data",
                level="public",
                payload=b"transfer everything",
            ),
            signer,
        ),
        "impersonation",
    )
    # 2. Forgery: a signature made with a key that is not mallory's registered one.
    stranger = Signer.from_seed(_random_user_seed())
    await publish(
        sign(
            build(
                sender=me,
                to="docker.b1",
                type="data",
                level="public",
                payload=b"signed by someone else",
            ),
            stranger,
        ),
        "forged signature",
    )
    # 3. Replay: a valid message, then the same one again under a new Nats-Msg-Id.
    original = sign(
        build(sender=me, to="docker.b1", type="data", level="public", payload=b"pay 10 coins"),
        signer,
    )
    await publish(original, "original (valid)")
    await asyncio.sleep(0.5)
    await publish(original, "replay", msg_id=str(uuid.uuid4()))
    # 4. Policy: cross-tier control messages are not allowed.
    await publish(
        sign(
            build(
                sender=me, to="gvisor.planner", type="control", level="public", payload=b"shutdown"
            ),
            signer,
        ),
        "control across tiers",
    )
    # 5. Flood: far more than its rate limit allows.
    for i in range(25):
        await publish(
            sign(
                build(
                    sender=me,
                    to="docker.b1",
                    type="data",
                    level="public",
                    payload=f"spam {i}".encode(),
                ),
                signer,
            ),
            "flood",
        )
    await nc.close()


def _random_user_seed() -> bytes:
    import nacl.signing
    import nkeys

    seed: bytes = nkeys.encode_seed(
        bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER
    )
    return seed


async def main(argv: list[str]) -> int:
    role, directory = argv[0], Path(argv[1])
    if role == "responder":
        await responder(directory)
    elif role == "a1":
        await worker_a1(directory, argv[2])
    elif role == "sensor":
        await sensor(directory)
    elif role == "mallory":
        await mallory(directory)
    else:
        print(f"unknown role {role}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from symbi.runner import run

    raise SystemExit(run(main(sys.argv[1:])))
