"""Who may say what: key identities checked against what a message claims (pure)."""

from __future__ import annotations

from opsbay_mqtt.errors import Refused
from opsbay_mqtt.signing import Auth, Identity, Keyring


def client_name(auth: Auth) -> str:
    """The requesting identity's name ("shared" for the shared key); node keys are refused."""
    if auth.identity is None:
        return "shared"
    if auth.identity.kind != "client":
        raise Refused(
            "wrong_identity",
            f"key {auth.kid!r} belongs to node {auth.identity.name!r}; "
            "a node key cannot submit, cancel or query",
        )
    return auth.identity.name


def require_node(auth: Auth, node: str) -> None:
    """Only node `node`'s own key (or the shared key) may speak for it."""
    who = auth.identity
    if who is not None and (who.kind, who.name) != ("node", node):
        raise Refused(
            "wrong_identity",
            f"key {auth.kid!r} of {who.kind} {who.name!r} cannot speak for node {node!r}",
        )


def node_kid(keyring: Keyring, node: str, last_used: str | None) -> str:
    """The key to sign a dispatch for `node` with: the one it last used, else its newest, else
    the shared key."""
    kids = keyring.kids_of(Identity("node", node))
    if kids:
        return last_used if last_used in kids else kids[-1]
    if keyring.shared_kid is None:
        raise Refused("unknown_node", f"there is no key for node {node!r}")
    return keyring.shared_kid
