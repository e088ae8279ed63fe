"""The worker's route-signing key: it vouches for each delivery it makes.

The key is the router's user nkey seed kept in the state directory
(``broker_gateway.keys.route_signer_seed``); its public half is in every
agent's ``agent.json`` as ``router_public_key``. ``symbi up`` creates it before
starting any worker, so a worker that finds none refuses to start rather than
mint a key that no agent knows. The tag format and its verification live in
:mod:`agent_sdk.route`, which agents use.
"""

from __future__ import annotations

from agent_sdk.errors import ConfigError
from agent_sdk.route import sign_route
from agent_sdk.signing import Signer
from broker_gateway.keys import ROUTE_KEY, KeyStore


class RouteSigner:
    """Signs route tags; shows only its public key."""

    __slots__ = ("_signer",)

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    @classmethod
    def from_store(cls, store: KeyStore) -> RouteSigner:
        path = store.path(ROUTE_KEY)
        try:
            seed = path.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"route-signing key {path} is missing: start `symbi up` on this state directory"
                " first (it creates the key)"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"cannot read the route-signing key {path}: {exc.strerror}") from exc
        return cls(Signer.from_seed(seed))

    @property
    def public_key(self) -> str:
        return self._signer.public_key

    def tag(self, *, msg_id: str, sender: str, recipient: str, sender_key: str) -> str:
        """The ``Symbi-Route`` value for one delivery."""
        return sign_route(
            self._signer, msg_id=msg_id, sender=sender, recipient=recipient, sender_key=sender_key
        )

    def __repr__(self) -> str:
        return f"RouteSigner(public_key={self.public_key!r})"
