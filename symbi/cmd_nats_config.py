"""``symbi nats-config``: the trust a NATS server of your own needs to carry a symbi bus.

It writes the operator JWT, the system account and the ``full`` resolver with
the router and system accounts preloaded; include the file in each server's
configuration (every server of a cluster), start the servers, then run
``symbi up --nats-url …`` on the same state directory, which pushes the tier
accounts and creates the streams.
"""

from __future__ import annotations

from pathlib import Path

from agent_sdk.errors import ConfigError
from broker_gateway.accounts import build_trust
from broker_gateway.server import trust_config
from broker_gateway.state import StateDir


def run(state_dir: str | None, out: str, jwt_dir: str) -> int:
    state = StateDir.open(state_dir)
    text = "# symbi trust, from `symbi nats-config`; include it in nats-server.conf\n"
    text += trust_config(build_trust(state.keys, {}), Path(jwt_dir).absolute())
    try:
        Path(out).write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from exc
    print(f"wrote {out}")
    return 0
