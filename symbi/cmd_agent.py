"""``symbi agent register | revoke | list``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from agent_sdk.errors import ConfigError
from agent_sdk.names import LEVELS, check_agent_id, check_tier
from broker_gateway import jwt
from broker_gateway.gateway import Gateway
from broker_gateway.keys import write_secret
from broker_gateway.state import StateDir
from symbi import runner


async def _connect(state_dir: str | None) -> Gateway:
    state = StateDir.open(state_dir, create=False)
    info = state.read_runtime()
    return await Gateway.connect(state, str(info["nats_url"]))


def _check_out_dir(out: Path) -> None:
    """Refuse before registering anything if the files cannot be written there."""
    for name in ("agent.creds", "agent.json"):
        if (out / name).exists():
            raise ConfigError(f"{out / name} already exists; refusing to overwrite credentials")
    if out.exists():
        if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write credentials into {out}")
    else:
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot create {out}")


async def _register(args: argparse.Namespace) -> int:
    tier = check_tier(args.tier)
    agent_id = check_agent_id(args.agent_id)
    if args.clearance not in LEVELS:
        raise ConfigError(f"invalid clearance {args.clearance!r}: one of {', '.join(LEVELS)}")
    out = Path(args.out).absolute()
    _check_out_dir(out)
    gateway = await _connect(args.state_dir)
    try:
        creds = await gateway.register_agent(
            tier,
            agent_id,
            clearance=args.clearance,
            capabilities=tuple(args.capabilities),
            subscriptions=tuple(args.subscriptions),
        )
    finally:
        await gateway.close()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_secret(out / "agent.creds", creds.creds)
    write_secret(out / "agent.json", json.dumps(creds.info, indent=2) + "\n")
    print(f"registered {creds.info['address']} ({creds.info['public_key']}); credentials in {out}")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    tier = check_tier(args.tier)
    agent_id = check_agent_id(args.agent_id)
    gateway = await _connect(args.state_dir)
    try:
        record = await gateway.revoke_agent(tier, agent_id)
    finally:
        await gateway.close()
    print(f"revoked {record.address}")
    return 0


async def _renew(args: argparse.Namespace) -> int:
    tier = check_tier(args.tier)
    agent_id = check_agent_id(args.agent_id)
    creds_path = Path(args.creds)
    try:
        old_jwt, seed = jwt.parse_creds(creds_path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {creds_path}: {exc.strerror}") from exc
    public_key = str(jwt.decode(old_jwt, verify=False)["sub"])
    gateway = await _connect(args.state_dir)
    try:
        token = await gateway.renew_agent(tier, agent_id, public_key)
    finally:
        await gateway.close()
    write_secret(creds_path, jwt.creds_file(token, seed))
    expires = jwt.decode(token, verify=False)["exp"]
    print(f"renewed {tier}.{agent_id} in {creds_path} (expires at {expires})")
    return 0


async def _list(args: argparse.Namespace) -> int:
    gateway = await _connect(args.state_dir)
    try:
        records = await (await gateway.registry()).list()
    finally:
        await gateway.close()
    if args.json:
        for r in records:
            print(json.dumps({"address": r.address, **r.model_dump(mode="json")}))
        return 0
    rows = [("ADDRESS", "CLEARANCE", "CAPABILITIES", "STATUS")]
    rows += [(r.address, r.clearance, ",".join(r.capabilities) or "-", r.status) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run(args: argparse.Namespace) -> int:
    handler = {"register": _register, "revoke": _revoke, "renew": _renew, "list": _list}[
        args.agent_command
    ]
    return runner.run(handler(args))
